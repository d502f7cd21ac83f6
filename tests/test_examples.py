"""The runnable examples in examples/ keep running (offline, tiny models)."""
import pathlib
import subprocess
import sys

import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_hf_trainer_example_trains():
    run = subprocess.run([sys.executable, str(EXAMPLES / "hf_trainer.py")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "lf kernels in llama: rms_norm (5), swiglu (2), rope (1), fused_linear_cross_entropy (1)" in run.stdout
    assert "train_loss" in run.stdout + run.stderr


def test_trl_sft_steps_match_unpatched():
    """Two optimizer steps of TRL's SFTTrainer on a patched model give the unpatched run's losses."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import trl_sft
    finally:
        sys.path.remove(str(EXAMPLES))
    from lf.kernels import patch, unpatch

    unpatched = trl_sft.train(trl_sft.tiny_llama(), steps=2)
    model = trl_sft.tiny_llama()
    patch(model)
    try:
        patched = trl_sft.train(model, steps=2)
    finally:
        unpatch(model)
    assert len(unpatched) == 2
    torch.testing.assert_close(torch.tensor(patched), torch.tensor(unpatched), rtol=1e-3, atol=1e-3)  # bf16 autocast
