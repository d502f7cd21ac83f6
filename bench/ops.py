"""The op cases: lf's op and the HF code it replaces, at real models' widths, on the same inputs.

Baselines come from each family's transformers modeling file: its RMSNorm module, its ``apply_rotary_pos_emb``
(cos/sin from its rotary embedding), its MLP's ``act_fn(gate) * up`` (``ACT2FN[hidden_act]``), and the loss as
its ForCausalLM computes it: ``lm_head(hidden)``, Gemma-2's final logit soft-capping, then ``ForCausalLMLoss``
(cross-entropy on fp32-upcast logits, labels shifted by one). The lm_head weight is frozen, as under LoRA
(``python -m bench lm-head-loss`` covers a trained head).

Minimum work per direction, the numerators of lf's achieved bandwidth and FLOP/s (e = bytes per element,
N = tokens, H = hidden, I = intermediate, D = head dim, Hq/Hkv = q/kv heads, V = vocabulary; rstd is fp32):

- rms_norm fwd: reads x and w, writes y and rstd: ``2*N*H*e + H*e + 4*N``
- rms_norm bwd: reads dy, x, w and rstd, writes dx and dw: ``3*N*H*e + 2*H*e + 4*N``
- rope fwd, and bwd alike: reads and writes q and k, reads cos and sin: ``2*N*(Hq + Hkv)*D*e + 2*N*D*e``
- swiglu / geglu fwd: reads gate and up, writes out: ``3*N*I*e``
- swiglu / geglu bwd: reads dy, gate and up, writes dgate and dup: ``5*N*I*e``
- fwd+bwd: the sum of the two, as they run as two passes.
- cross_entropy fwd+bwd: reads the logits, writes their gradient: ``2*N*V*e``
- fused_linear_cross_entropy fwd+bwd: ``4*N*H*V`` FLOPs (the logits, then hidden's gradient); reads hidden and
  the weight, writes hidden's gradient: ``(2*N*H + V*H)*e``

lf computes both losses' gradients in the forward pass (the backward only scales them), so their fwd and bwd
alone have no minimum that lf's split could be judged by: only their fwd+bwd is.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OP_NAMES = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy")
PROMPT_FRACTION = 0.1  # the first 10% of labels are -100, a prompt, as in bench/lm_head_loss.py

# Tokens per op on a CPU: a full run (3 models x 5 ops x 2 dtypes, under each allocator setting, plus the memory
# children) fits in ~15 minutes on 2 cores. The elementwise ops' tensors stay far larger than a core's L2 (7 MiB
# at the smallest, rms_norm's x in bf16 at hidden 3584, vs 2 MiB). --quick takes QUICK_TOKENS.
TOKENS = {"rms_norm": 1024, "rope": 1024, "swiglu": 1024, "geglu": 1024, "cross_entropy": 256,
          "fused_linear_cross_entropy": 64}
QUICK_TOKENS = {"rms_norm": 256, "rope": 256, "swiglu": 256, "geglu": 256, "cross_entropy": 32,
                "fused_linear_cross_entropy": 16}
GPU_TOKEN_SCALE = 16  # an accelerator runs the same ops at 16x the tokens
# (untimed, timed) rounds at most for the ops whose one call takes seconds on a CPU; the others take --warmup and
# --repeats as given.
HEAVY_ROUNDS = {"cross_entropy": (1, 5), "fused_linear_cross_entropy": (1, 3)}

# Targets that --check enforces on the rows of TARGET_MODELS (the widths the targets were set at, then over 4096
# tokens; they hold at 1024): lf's speed-up over HF eager per op (every direction and dtype); lf no slower than
# torch.compile beyond the noise margin (those ops); RMSNorm forward's share of copy bandwidth.
TARGET_MODELS = ("llama-3-8b",)
SPEEDUP_VS_EAGER = {"rms_norm": 4.0, "rope": 3.0, "swiglu": 2.0}
COMPILE_TARGET_OPS = ("rms_norm", "rope", "swiglu", "geglu")
COMPILE_NOISE_MARGIN = 1.10
RMS_NORM_FWD_COPY_FRACTION = 0.70


@dataclass(frozen=True)
class Model:
    """One model's widths, from its config on the Hugging Face hub, and the transformers family it belongs to."""
    family: str  # transformers' model_type: transformers.models.<family>.modeling_<family> holds the baselines
    prefix: str  # that file's class-name prefix
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float
    act: str  # the MLP's activation, as the config names it
    gemma_norm: bool = False  # RMSNorm scales by (1 + weight), all in fp32, rounded once at the end
    softcap: float | None = None  # final_logit_softcapping
    mrope_section: tuple[int, ...] | None = None  # multimodal RoPE: benched for rope alone (its other ops are Qwen2's)

    @property
    def glu(self) -> str:
        return "swiglu" if self.act == "silu" else "geglu"

    @property
    def ops(self) -> tuple[str, ...]:
        if self.mrope_section:
            return ("rope",)
        return tuple(op for op in OP_NAMES if op not in {"swiglu", "geglu"} - {self.glu})

    def modeling(self, name: str):
        module = importlib.import_module(f"transformers.models.{self.family}.modeling_{self.family}")
        return getattr(module, name.format(self.prefix))

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.for_model(
            self.family, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_attention_heads=self.q_heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            vocab_size=self.vocab, rms_norm_eps=self.rms_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})


MODELS = {
    "llama-3-8b": Model("llama", "Llama", 4096, 14336, 32, 8, 128, 128256, 1e-5, 500000.0, "silu"),
    "qwen2.5-7b": Model("qwen2", "Qwen2", 3584, 18944, 28, 4, 128, 152064, 1e-6, 1000000.0, "silu"),
    "gemma-2-9b": Model("gemma2", "Gemma2", 3584, 14336, 16, 8, 256, 256000, 1e-6, 10000.0, "gelu_pytorch_tanh",
                        gemma_norm=True, softcap=30.0),
    "qwen2-vl-7b": Model("qwen2_vl", "Qwen2VL", 3584, 18944, 28, 4, 128, 152064, 1e-6, 1000000.0, "silu",
                         mrope_section=(16, 24, 24)),
}
QUICK_MODEL = "llama-3-8b"


@dataclass
class Case:
    args: tuple[torch.Tensor, ...]  # the op's inputs, shared by every implementation
    leaves: tuple[torch.Tensor, ...]  # everything that receives a .grad: the inputs and any weight
    impls: dict[str, Callable]  # "lf", "eager" (HF's code; also run through torch.compile), maybe "liger"
    # direction -> (minimum bytes, FLOPs or None); a direction absent has no minimum to judge lf by
    work: dict[str, tuple[int, int | None]] = field(default_factory=dict)


def _two_pass(fwd_bytes: int, bwd_bytes: int) -> dict[str, tuple[int, None]]:
    return {"fwd": (fwd_bytes, None), "bwd": (bwd_bytes, None), "fwd+bwd": (fwd_bytes + bwd_bytes, None)}


def _randn(*shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()


def liger_functional(device: str):
    """Liger-Kernel's functional API where it runs (CUDA, the package installed), else None."""
    if device != "cuda":
        return None
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    return functional


def rms_norm_case(m: Model, tokens: int, dtype: torch.dtype, device: str) -> Case:
    from lf.kernels import rms_norm

    x = _randn(1, tokens, m.hidden, dtype=dtype, device=device)
    hf = m.modeling("{}RMSNorm")(m.hidden, eps=m.rms_eps).to(device, dtype)  # weight as initialised
    w = hf.weight.detach().clone().requires_grad_()
    offset, casting = (1.0, "gemma") if m.gemma_norm else (0.0, "llama")
    impls = {"lf": lambda x: rms_norm(x, w, m.rms_eps, offset, casting), "eager": hf}
    if liger := liger_functional(device):  # in_place=False: the bench reuses its output gradient
        impls["liger"] = lambda x: liger.liger_rms_norm(x, w, m.rms_eps, offset, casting, in_place=False)
    e, n, h = x.element_size(), tokens, m.hidden
    return Case(args=(x,), leaves=(x, w, hf.weight), impls=impls,
                work=_two_pass(2 * n * h * e + h * e + 4 * n, 3 * n * h * e + 2 * h * e + 4 * n))


def rope_case(m: Model, tokens: int, dtype: torch.dtype, device: str) -> Case:
    from lf.kernels import rope

    # As HF's attention makes them: (batch, seq, heads, dim) projections viewed heads-first.
    q = torch.randn(1, tokens, m.q_heads, m.head_dim, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(1, tokens, m.kv_heads, m.head_dim, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
    e = q.element_size()
    moved = 2 * tokens * (m.q_heads + m.kv_heads) * m.head_dim * e + 2 * tokens * m.head_dim * e
    if m.mrope_section:
        return _mrope_case(m, q, k, rope, _two_pass(moved, moved))
    rotary = m.modeling("{}RotaryEmbedding")(m.config()).to(device)
    cos, sin = rotary(q, torch.arange(tokens, device=device)[None])
    impls = {"lf": rope, "eager": m.modeling("apply_rotary_pos_emb")}
    if liger := liger_functional(device):
        impls["liger"] = liger.liger_rope
    return Case(args=(q, k, cos, sin), leaves=(q, k), impls=impls, work=_two_pass(moved, moved))


def _mrope_case(m: Model, q: torch.Tensor, k: torch.Tensor, rope: Callable, work: dict) -> Case:
    """Multimodal RoPE: cos/sin of the three position streams, (3, 1, N, D), for a row that is one image of
    N // 16 x 16 patches (temporal 0, height the patch row, width the patch column) after no text. lf's rope selects
    each frequency's stream itself (mrope_section); HF's baseline is its own section split (the rotary
    embedding's recomposition_frequencies, on one half of the duplicated angles) then apply_rotary_pos_emb. The
    selection is part of each call in both, as it is of each forward in the model."""
    from transformers import AutoConfig

    tokens, device, dtype = q.shape[2], q.device, q.dtype
    config = AutoConfig.for_model(f"{m.family}_text", hidden_size=m.hidden, num_attention_heads=m.q_heads,
                                  head_dim=m.head_dim, rope_parameters={
                                      "rope_type": "default", "rope_theta": m.rope_theta,
                                      "mrope_section": list(m.mrope_section)})
    rotary = m.modeling("{}RotaryEmbedding")(config).to(device)
    row = torch.arange(tokens, device=device)
    positions = torch.stack([torch.zeros_like(row), row // 16, row % 16])[:, None]  # (3, 1, N)
    angles = positions[..., None].float() * rotary.inv_freq.float()
    cos, sin = (torch.cat([f, f], dim=-1).to(dtype) for f in (angles.cos(), angles.sin()))
    apply = m.modeling("apply_rotary_pos_emb")
    half = m.head_dim // 2

    def eager(q, k, cos, sin):
        cos, sin = (rotary.recomposition_frequencies(t[..., :half]) for t in (cos, sin))
        return apply(q, k, cos, sin)

    impls = {"lf": lambda q, k, cos, sin: rope(q, k, cos, sin, mrope_section=m.mrope_section), "eager": eager}
    return Case(args=(q, k, cos, sin), leaves=(q, k), impls=impls, work=work)


def glu_case(m: Model, tokens: int, dtype: torch.dtype, device: str) -> Case:
    from transformers.activations import ACT2FN

    from lf.kernels import geglu, swiglu

    gate = _randn(1, tokens, m.intermediate, dtype=dtype, device=device)
    up = _randn(1, tokens, m.intermediate, dtype=dtype, device=device)
    act = ACT2FN[m.act]  # the MLP's act_fn
    impls = {"lf": swiglu if m.glu == "swiglu" else functools.partial(geglu, approximate="tanh"),
             "eager": lambda gate, up: act(gate) * up}
    if liger := liger_functional(device):
        impls["liger"] = liger.liger_swiglu if m.glu == "swiglu" else liger.liger_geglu
    size = gate.numel() * gate.element_size()
    return Case(args=(gate, up), leaves=(gate, up), impls=impls, work=_two_pass(3 * size, 5 * size))


def _labels(tokens: int, vocab: int, device: str) -> torch.Tensor:
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    labels[:, : int(tokens * PROMPT_FRACTION)] = -100
    return labels


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """The labels each position predicts, as ForCausalLMLoss shifts them."""
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


def hf_loss(m: Model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss as HF's ForCausalLM computes it from the logits (soft-capped first for Gemma-2)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if m.softcap is not None:
        logits = torch.tanh(logits / m.softcap) * m.softcap
    return ForCausalLMLoss(logits, labels, m.vocab)


def cross_entropy_case(m: Model, tokens: int, dtype: torch.dtype, device: str) -> Case:
    from lf.kernels import cross_entropy

    logits = _randn(1, tokens, m.vocab, dtype=dtype, device=device)
    labels = _labels(tokens, m.vocab, device)
    impls = {"lf": lambda z, y: cross_entropy(z, _shifted(y), softcap=m.softcap),
             "eager": functools.partial(hf_loss, m)}
    if liger := liger_functional(device):
        impls["liger"] = lambda z, y: liger.liger_cross_entropy(z.view(-1, m.vocab), _shifted(y).view(-1),
                                                                softcap=m.softcap)
    return Case(args=(logits, labels), leaves=(logits,), impls=impls,
                work={"fwd+bwd": (2 * logits.numel() * logits.element_size(), None)})


def fused_linear_cross_entropy_case(m: Model, tokens: int, dtype: torch.dtype, device: str) -> Case:
    from lf.kernels import fused_linear_cross_entropy

    hidden = _randn(1, tokens, m.hidden, dtype=dtype, device=device)
    # The frozen lm_head, std H**-0.5 as the logits' scale needs; uniform: it fills GiBs faster than randn.
    bound = (3 / m.hidden) ** 0.5
    weight = torch.empty(m.vocab, m.hidden, dtype=dtype, device=device).uniform_(-bound, bound)
    labels = _labels(tokens, m.vocab, device)
    impls = {"lf": lambda h, w, y: fused_linear_cross_entropy(h, w, _shifted(y), softcap=m.softcap),
             "eager": lambda h, w, y: hf_loss(m, F.linear(h, w), y)}
    if liger := liger_functional(device):
        impls["liger"] = lambda h, w, y: liger.liger_fused_linear_cross_entropy(
            h.view(-1, m.hidden), w, _shifted(y).view(-1), softcap=m.softcap)
    e = hidden.element_size()
    return Case(args=(hidden, weight, labels), leaves=(hidden,), impls=impls,
                work={"fwd+bwd": ((2 * tokens * m.hidden + m.vocab * m.hidden) * e, 4 * tokens * m.hidden * m.vocab)})


BUILDERS: dict[str, Callable[[Model, int, torch.dtype, str], Case]] = {
    "rms_norm": rms_norm_case,
    "rope": rope_case,
    "swiglu": glu_case,
    "geglu": glu_case,
    "cross_entropy": cross_entropy_case,
    "fused_linear_cross_entropy": fused_linear_cross_entropy_case,
}


def tokens_for(op: str, quick: bool, device: str) -> int:
    return (QUICK_TOKENS if quick else TOKENS)[op] * (GPU_TOKEN_SCALE if device == "cuda" else 1)


def rounds(op: str, warmup: int, repeats: int) -> tuple[int, int]:
    most = HEAVY_ROUNDS.get(op)
    return (min(warmup, most[0]), min(repeats, most[1])) if most else (warmup, repeats)


def build(model: str, op: str, dtype: str, tokens: int, device: str) -> Case:
    torch.manual_seed(0)  # every implementation and process gets the same values
    return BUILDERS[op](MODELS[model], tokens, DTYPES[dtype], device)
