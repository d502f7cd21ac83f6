"""The runnable examples in examples/ keep running (offline, tiny models)."""
import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_hf_trainer_example_trains():
    run = subprocess.run([sys.executable, str(EXAMPLES / "hf_trainer.py")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "lf kernels in llama: rms_norm (5), swiglu (2), rope (1), fused_linear_cross_entropy (1)" in run.stdout
    assert "train_loss" in run.stdout + run.stderr
