"""`lf train` end to end: tokens/s, peak memory and loss curves of lf's variants and of LLaMA-Factory, same model,
data and settings.

    python -m bench.train_e2e            # 30 steps per variant, fp32 and (where the CPU has native bf16) bf16
    python -m bench.train_e2e --quick    # 3 steps, the dtype lf's `infer_dtype: auto` picks here (smoke)
    python -m bench.train_e2e --only vl  # the LLaVA rows alone (--only text | vl | video | vl_qwen2, one or more)
    python -m bench.train_e2e --only video --repeats 3   # each variant 3 times, its fastest run kept
    python -m bench.train_e2e --only text --variants "no packing, LoRA" --steps 8   # variants naming it (memory)

Model: bench.e2e_model (a 31.8M-parameter Llama, tokenizer trained on the data). Data: alpaca_en_demo from
../shared/data, template qwen, cutoff 512, batch 4, LoRA rank 8 on all linear layers, lr 2e-3 cosine, seed 42.
lf: kernels on/off x packing on/off x LoRA/QLoRA (4-bit nf4) = 8 variants per dtype (lf's packing is neat: examples
share rows but never see each other). LLaMA-Factory (its own venv: $LF_BENCH_LLAMAFACTORY, else
~/.cache/llamafactory-venv/bin/python), LoRA, without packing and with neat_packing. bf16 = bf16 weights, fp32
adapters, autocast (`bf16: true`), in both systems.

Allocator: lf trains on the CPU with glibc's malloc "tuned" (lf/allocator.py; `cpu_allocator`), LLaMA-Factory with
glibc's defaults; one extra run of each uses the other's setting, so the table shows what the allocator is worth.
Gradient checkpointing: LLaMA-Factory checkpoints every decoder layer by default; lf on the CPU leaves it off when
a micro-batch's activations fit in a tenth of the available memory (here ~240 MiB: off) and hands fragmented heap
back to the OS as it grows (lf/allocator.py). One extra run of each takes the other's choice.
The speed-up column is against LLaMA-Factory's fastest variant of the run.

The VL rows (group "vl", see VL below): LoRA sft of a tiny LLaVA-1.5 on mllm_demo, lf with kernels on and off
against LLaMA-Factory, same model, data and settings. The Qwen2-VL rows (groups "video": mllm_video_demo, and
"vl_qwen2": mllm_demo) put lf against transformers' Trainer + PEFT on lf's rows (system "hf"): LLaMA-Factory 0.9.5
cannot load Qwen2-VL's processor without torchvision (see QWEN2_VL_ABOUT).

Every worker, of either system, sees triton, deepspeed and bitsandbytes as uninstalled (UNUSED_ON_CPU; QLoRA keeps
bitsandbytes): a CPU install of lf and LLaMA-Factory's venv have none of them, lf's development venv has all three,
and torch, transformers and peft import each one that is installed.

Each variant is one child process that runs its trainer in-process with a probe callback (`--worker`):
- tokens: real (non-padding) tokens trained on. lf: `total_tokens` of its trainer_log.jsonl. LLaMA-Factory: its
  collator is wrapped to count the non-zero attention-mask entries of each batch's features (neat packing marks
  padding 0, examples 1, 2, ...); step s has trained on the first s batches (the dataloader collates ahead);
- tokens/s: those tokens / the seconds from the trainer's on_train_begin to its on_train_end;
- memory: at on_train_begin the probe reads VmRSS (the baseline: model, data and optimizer built; Adam's states come
  at the first step, so they count as training's) and VmHWM, then
  resets VmHWM (`5` into /proc/self/clear_refs); at on_train_end VmHWM - baseline is the training's peak above
  its baseline. Peak RSS = the larger of VmHWM before the reset and at the child's end. The child process only.
Loss curves are drawn against tokens trained on (packing puts more tokens in each step). Writes
bench/results/<device>/<date>-train_e2e.{json,md,png} (scratch/ for --quick; with --only, the groups' names after
it: `-vl`, `-video-vl_qwen2`, ...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import harness

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data"  # LLaMA-Factory's demo data and its dataset_info.json
DATASET = "alpaca_en_demo"
DEFAULT_LLAMAFACTORY = Path.home() / ".cache" / "llamafactory-venv" / "bin" / "python"
NAME = "train_e2e"
SETTINGS = dict(stage="sft", do_train=True, finetuning_type="lora", lora_rank=8, lora_target="all",
                dataset=DATASET, dataset_dir=str(DATA_DIR), template="qwen", cutoff_len=512,
                per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=2e-3,
                lr_scheduler_type="cosine", seed=42, logging_steps=1, save_strategy="no", report_to="none",
                plot_loss=False, overwrite_output_dir=True, use_cpu=True)  # (transformers' bf16 on CPU needs it)
DTYPES = {"fp32": dict(infer_dtype="float32"), "bf16": dict(infer_dtype="bfloat16", bf16=True)}
LF_VARIANTS = {
    f"lf, kernels {'on' if kernels else 'off'}, {'packing' if packing else 'no packing'}, {method}": dict(
        use_lf_kernels=kernels, packing=packing, **({"quantization_bit": 4} if method == "QLoRA" else {}))
    for method in ("LoRA", "QLoRA") for kernels in (True, False) for packing in (True, False)}
# lf's default glibc allocator setting is "tuned" (lf/allocator.py): one run of each system with the other's setting
LF_VARIANTS["lf, kernels on, packing, LoRA, glibc's default allocator"] = dict(use_lf_kernels=True, packing=True,
                                                                            cpu_allocator="default")
# lf on the CPU leaves gradient checkpointing off where the activations fit (LLaMA-Factory checkpoints every
# decoder layer): one run of each with the other's choice
LF_VARIANTS["lf, kernels on, packing, LoRA, every layer checkpointed"] = dict(use_lf_kernels=True, packing=True,
                                                                          disable_gradient_checkpointing=False)
ALLOCATOR_KEY = "lf_bench_allocator"  # in a LLaMA-Factory config: the worker applies it, then drops it
LLAMAFACTORY_VARIANTS = {"LLaMA-Factory, no packing, LoRA": {},
                         "LLaMA-Factory, neat_packing, LoRA": dict(packing=True, neat_packing=True),
                         "LLaMA-Factory, neat_packing, LoRA, lf's tuned allocator": dict(
                             packing=True, neat_packing=True, **{ALLOCATOR_KEY: "tuned"}),
                         "LLaMA-Factory, neat_packing, LoRA, no gradient checkpointing": dict(
                             packing=True, neat_packing=True, disable_gradient_checkpointing=True)}
COLORS = {(True, False): "tab:blue", (False, False): "tab:orange",  # (use_lf_kernels, QLoRA) -> a curve's colour
          (True, True): "tab:green", (False, True): "tab:red"}
LF_BASELINE = "lf, kernels off, no packing, LoRA"  # the speed-up reference when LLaMA-Factory is absent


@dataclass(frozen=True)
class Group:
    """A set of rows on one model and data set: its settings over SETTINGS, its variants, its model builder."""
    dataset: str
    settings: dict
    lf_variants: dict
    llamafactory_variants: dict
    lf_baseline: str  # the speed-up reference when no other system ran
    model: str  # bench.e2e_model's builder
    about: str  # the model and settings, for the report
    hf_variants: dict = field(default_factory=dict)  # plain transformers Trainer + PEFT on lf's data (_run_hf)


# The vision-language row: LoRA sft of a tiny LLaVA-1.5 on mllm_demo (6 conversations, 1-2 images each; the images
# are decoded and turned into pixels by each system's own pipeline). LLaVA, not Qwen2-VL: LLaMA-Factory 0.9.5
# builds Qwen2-VL's processor class, which needs torchvision, unusable beside the CPU torch.
VL = Group("mllm_demo", dict(dataset="mllm_demo", template="llava", cutoff_len=1024, per_device_train_batch_size=2),
           {f"lf, kernels {'on' if kernels else 'off'}, LoRA, VL": dict(use_lf_kernels=kernels)
            for kernels in (True, False)},
           {"LLaMA-Factory, LoRA, VL": {}}, "lf, kernels off, LoRA, VL", "ensure_vl_model",
           "tiny LLaVA-1.5 (bench/e2e_model.py: CLIP tower 2 layers at 112 px, 64 tokens an image; Llama 4 layers, "
           "hidden 256; 3.8M parameters), template llava, cutoff 1024, batch 2, vision tower and projector frozen")
# The Qwen2-VL rows, videos (mllm_video_demo: 3 clips of 6-10 s, 2 frames a second at most 256 x 256 pixels, 551-890
# tokens a row) and images (mllm_demo; image_max_pixels 224 x 224: 64 tokens an image, as the LLaVA row). LLaMA-Factory
# 0.9.5 cannot run them here: its loader's AutoProcessor builds Qwen2VLProcessor, whose Qwen2VLVideoProcessor needs
# torchvision, so it goes on without a processor and its mm_plugin stops at the first image or video ("Processor was
# not found"). Their baseline is plain transformers: Trainer + PEFT on the unpatched model, fed lf's rows.
QWEN2_VL_ABOUT = ("tiny Qwen2-VL (bench/e2e_model.py: vision tower 2 blocks of 128 at 14 px patches, 2 x 2 merged; the "
                  "LLaVA row's Llama widths with M-RoPE sections 8/12/12; 4.2M parameters), template qwen2_vl, cutoff "
                  "1024, batch 2, vision tower and merger frozen. LLaMA-Factory 0.9.5 cannot load Qwen2-VL's processor "
                  "without torchvision (see bench/README.md): the baseline is transformers' Trainer + PEFT LoRA on the "
                  "unpatched model with lf's rows and collator")


def qwen2_vl_group(dataset: str, **settings) -> Group:
    return Group(dataset, dict(dataset=dataset, template="qwen2_vl", cutoff_len=1024, per_device_train_batch_size=2,
                               **settings),
                 {f"lf, kernels {'on' if kernels else 'off'}, LoRA, Qwen2-VL": dict(use_lf_kernels=kernels)
                  for kernels in (True, False)},
                 {}, "lf, kernels off, LoRA, Qwen2-VL", "ensure_qwen2_vl_model", QWEN2_VL_ABOUT,
                 {"transformers Trainer + PEFT, LoRA, Qwen2-VL": {}})


GROUPS = {"text": Group(DATASET, {}, LF_VARIANTS, LLAMAFACTORY_VARIANTS, LF_BASELINE, "ensure_model",
                        "Llama, 31.8M parameters, vocab 8000 (bench/e2e_model.py), template qwen, cutoff 512, "
                        "batch 4"),
          "vl": VL,
          "video": qwen2_vl_group("mllm_video_demo"),
          "vl_qwen2": qwen2_vl_group("mllm_demo", image_max_pixels=224 * 224)}


# ---- the worker: one variant, in its own process ----

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # "VmHWM:   123456 kB"
    raise RuntimeError(f"no {field} in /proc/self/status")


def _probe(count=None):
    """A TrainerCallback measuring the training's time and memory; with `count` (tokens trained on after step s),
    also the loss curve."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self):
            self.facts, self.curve = {}, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.facts.update(baseline_kib=_status_kib("VmRSS"), hwm_before_kib=_status_kib("VmHWM"))
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if count is not None and logs and "loss" in logs:
                self.curve.append((state.global_step, count(state.global_step), logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            self.facts.update(seconds=time.perf_counter() - self.start, train_hwm_kib=_status_kib("VmHWM"),
                              steps=state.global_step)

    return Probe()


def _run_lf(config: dict):
    import lf
    from lf.config import parse_train_args
    from lf.train import run

    probe = _probe()
    run(parse_train_args(config), callbacks=[probe])
    log = [json.loads(line) for line in (Path(config["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    curve = [(r["current_steps"], r["total_tokens"], r["loss"]) for r in log if "loss" in r]
    return probe, curve, {"lf": lf.__version__}


def _run_llamafactory(config: dict):
    from lf import allocator  # pure Python, importable from the source tree in LLaMA-Factory's venv

    allocator.apply(config.pop(ALLOCATOR_KEY, "default"))  # before the model and data allocate
    import llamafactory
    import peft
    import transformers
    from llamafactory.train.sft import workflow
    from llamafactory.train.tuner import run_exp

    counts = []  # real tokens of each batch, in the order the dataloader collates them

    class CountingCollator(workflow.SFTDataCollatorWith4DAttentionMask):
        def __call__(self, features):
            counts.append(sum(1 for f in features for m in f["attention_mask"] if m))
            return super().__call__(features)

    workflow.SFTDataCollatorWith4DAttentionMask = CountingCollator
    probe = _probe(lambda step: sum(counts[:step]))  # one batch per step (gradient_accumulation_steps 1)
    run_exp(config, callbacks=[probe])
    return probe, probe.curve, {"llamafactory": llamafactory.__version__, "transformers": transformers.__version__,
                                "peft": peft.__version__}


# Installed in lf's development venv (its gpu, test, deepspeed and qlora extras), absent from a CPU install of lf and
# from LLaMA-Factory's venv, and imported by torch, transformers and peft whenever installed, used or not: triton (by
# torch._dynamo, which transformers' masking utilities import), deepspeed (transformers.integrations.deepspeed),
# bitsandbytes (peft.helpers). Measured at on_train_begin of the VL row: 73, 21 and 44 MiB of RSS.
UNUSED_ON_CPU = ("triton", "deepspeed", "bitsandbytes")


def hide_unused_packages(config: dict) -> list[str]:
    """Make the packages of UNUSED_ON_CPU that `config` does not use look uninstalled to this process, for both
    systems alike: `import` fails and importlib.util.find_spec returns None, as where they are absent."""
    hidden = [name for name in UNUSED_ON_CPU if not (name == "bitsandbytes" and "quantization_bit" in config)]
    loaded = [name for name in hidden if name in sys.modules]
    if loaded:
        raise RuntimeError(f"{', '.join(loaded)} imported before the worker could hide them")
    sys.modules.update(dict.fromkeys(hidden))
    return hidden


def _run_hf(config: dict):
    """transformers' Trainer with a PEFT LoRA on the language model's linear layers (lf's `lora_target: all` on a
    VL model) of the unpatched model, on lf's tokenized rows and collator: transformers has no data pipeline for
    these rows without torchvision. glibc's default allocator, as plain transformers runs."""
    import peft
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, Trainer

    from lf.config import parse_train_args
    from lf.data import collator, fit_template, get_dataset
    from lf.data.collator import TOKENS_KEY
    from lf.model import load_mm_processor, load_tokenizer
    from lf.model.options import choose_dtype

    cfg = parse_train_args(config)
    tokenizer = load_tokenizer(cfg.model)
    template = fit_template(tokenizer, cfg.data)
    media = load_mm_processor(cfg.model, cfg.data, tokenizer, template)
    data = get_dataset(cfg.data, tokenizer=tokenizer, template=template, stage="sft", seed=cfg.training.seed,
                       media=media)
    transformers.set_seed(cfg.training.seed)
    model = AutoModelForImageTextToText.from_pretrained(cfg.model.model_name_or_path,
                                                        dtype=choose_dtype(cfg.model.infer_dtype)[0])
    targets = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".language_model." in name]
    model = peft.get_peft_model(model, peft.LoraConfig(r=cfg.finetuning.lora_rank, lora_alpha=cfg.finetuning.lora_alpha,
                                                       lora_dropout=0.0, target_modules=targets))
    counts = []  # lf's count of each batch's real tokens, taken out before the model sees the batch
    collate = collator(tokenizer, count_tokens=True, media=media)

    def counting(features):
        batch = collate(features)
        counts.append(int(batch.pop(TOKENS_KEY)))
        return batch

    probe = _probe(lambda step: sum(counts[:step]))
    Trainer(model=model, args=cfg.training, train_dataset=data.train_dataset, data_collator=counting,
            processing_class=tokenizer, callbacks=[probe]).train()
    return probe, probe.curve, {"transformers": transformers.__version__, "peft": peft.__version__}


RUNNERS = {"lf": _run_lf, "llamafactory": _run_llamafactory, "hf": _run_hf}


def worker(system: str, config_path: str, result_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    hidden = hide_unused_packages(config)
    probe, curve, versions = RUNNERS[system](config)
    facts = probe.facts
    result = {"steps": facts["steps"], "seconds": facts["seconds"], "tokens": curve[-1][1],
              "peak_rss_mib": max(facts["hwm_before_kib"], _status_kib("VmHWM")) / 1024,
              "baseline_rss_mib": facts["baseline_kib"] / 1024,
              "peak_above_baseline_mib": (facts["train_hwm_kib"] - facts["baseline_kib"]) / 1024,
              "curve": curve, "versions": versions, "hidden_packages": hidden}
    Path(result_path).write_text(json.dumps(result))


# ---- the parent ----

def find_llamafactory() -> tuple[str | None, str]:
    """LLaMA-Factory's python and a line naming its version, or None and why it is not used."""
    given = os.environ.get("LF_BENCH_LLAMAFACTORY")
    python = Path(given) if given else DEFAULT_LLAMAFACTORY
    if not python.exists():
        return None, (f"LF_BENCH_LLAMAFACTORY={given} does not exist" if given else
                      f"LLaMA-Factory is not installed at {DEFAULT_LLAMAFACTORY} and LF_BENCH_LLAMAFACTORY is unset "
                      f"(see bench/README.md, 'train')")
    check = subprocess.run([str(python), "-c", "import llamafactory.train.tuner, llamafactory; "
                            "print(llamafactory.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        return None, f"{python} cannot import llamafactory: {(check.stderr.strip().splitlines() or ['?'])[-1]}"
    return str(python), f"llamafactory {check.stdout.strip()} ({python})"


def run_variant(python: str, system: str, config: dict, folder: Path) -> dict:
    """One variant in a child process; its result."""
    folder.mkdir(parents=True)
    config = {**config, "output_dir": str(folder / "out")}
    (folder / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(folder / "datasets")}  # nothing reused
    started = time.perf_counter()
    child = subprocess.run([python, "-m", "bench.train_e2e", "--worker", system, str(folder / "config.json"),
                            str(folder / "result.json")], cwd=REPO, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"exit code {child.returncode}:\n{child.stderr[-3000:]}")
    return {**json.loads((folder / "result.json").read_text()), "wall_seconds": time.perf_counter() - started}


def plan(dtypes: list[str], steps: int, models: dict[str, Path], llamafactory: str | None,
         names: list[str] | None = None) -> list[tuple[str, str, str, str, dict]]:
    """(group, dtype, variant, system, config) for every run, LLaMA-Factory's first in each group and dtype; with
    `names`, only the variants whose name contains one of them."""
    runs = []
    for name, group in ((name, GROUPS[name]) for name in models):
        for dtype in dtypes:
            base = {**SETTINGS, **group.settings, "model_name_or_path": str(models[name]), "max_steps": steps}
            if llamafactory:
                runs += [(name, dtype, variant, "llamafactory",
                          {**base, **({"bf16": True} if dtype == "bf16" else {}), **extra})
                         for variant, extra in group.llamafactory_variants.items()]
            runs += [(name, dtype, variant, "hf", {**base, **DTYPES[dtype], **extra})
                     for variant, extra in group.hf_variants.items()]
            runs += [(name, dtype, variant, "lf", {**base, **DTYPES[dtype], **extra})
                     for variant, extra in group.lf_variants.items()]
    return [run for run in runs if not names or any(n in run[2] for n in names)]


def _baseline(rows: list[dict], dtype: str, group: str) -> dict:
    """The reference of the speed-up column: the fastest variant of the other system (LLaMA-Factory, the issue's
    "best"; plain transformers where LLaMA-Factory cannot run), else lf's plainest run."""
    mine = [r for r in rows if r["dtype"] == dtype and r.get("group", "text") == group]
    theirs = [r for r in mine if r["system"] != "lf"]
    return max(theirs, key=lambda r: r["tokens_per_s"]) if theirs else {
        r["variant"]: r for r in mine}[GROUPS[group].lf_baseline]


def table(rows: list[dict], dtype: str, compact: bool = False, group: str = "text") -> list[str]:
    base = _baseline(rows, dtype, group)
    rows = [{**r, "speedup": r["tokens_per_s"] / base["tokens_per_s"]} for r in rows
            if r["dtype"] == dtype and r.get("group", "text") == group]
    if compact:
        lines = [f"| variant ({dtype}) | tokens/s | vs {base['variant']} | peak RSS MiB | peak above baseline MiB "
                 "| final loss |", "|---|--:|--:|--:|--:|--:|"]
        return lines + [f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x "
                        f"| {r['peak_rss_mib']:,.0f} | {r['peak_above_baseline_mib']:,.0f} | {r['final_loss']:.3f} |"
                        for r in rows]
    lines = [f"| variant | steps | tokens | tokens/s | speed-up vs {base['variant']} | peak RSS MiB "
             "| peak above baseline MiB | final loss |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    return lines + [f"| {r['variant']} | {r['steps']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} "
                    f"| {r['speedup']:.2f}x | {r['peak_rss_mib']:,.0f} "
                    f"| {r['peak_above_baseline_mib']:,.0f} | {r['final_loss']:.3f} |" for r in rows]


def plot(rows: list[dict], dtypes: list[str], groups: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(groups), len(dtypes), figsize=(7 * len(dtypes), 5.5 * len(groups)),
                                squeeze=False)
    for group, line in zip(groups, axes):
        for ax, dtype in zip(line, dtypes):
            for r in (r for r in rows if r["dtype"] == dtype and r["group"] == group):
                _, tokens, loss = zip(*r["curve"])
                config = r["settings"]
                # colour: the system, kernels and LoRA/QLoRA; solid: packed, dashed: one example per row.
                # Kernels-on curves are wide and pale, so that the kernels-off curve drawn over one stays visible
                # where they agree
                lf_kernels = config.get("use_lf_kernels", False)
                color = "black" if r["system"] != "lf" else COLORS[lf_kernels, "quantization_bit" in config]
                ax.plot(tokens, loss, color=color, linestyle="-" if config.get("packing") else "--",
                        label=r["variant"], linewidth=4 if lf_kernels else 1.5, alpha=0.45 if lf_kernels else 1)
            config = {**SETTINGS, **GROUPS[group].settings}
            ax.set(title=f"{dtype}: {config['dataset']}, cutoff {config['cutoff_len']}, batch "
                         f"{config['per_device_train_batch_size']}", xlabel="tokens trained on",
                   ylabel="training loss")
            ax.legend(fontsize=7)
    others = sorted({r["variant"].split(",")[0] for r in rows if r["system"] != "lf"}) or ["itself"]
    figure.suptitle(f"lf train vs {' and '.join(others)}, LoRA r8 on all linears (QLoRA: 4-bit base)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 steps per variant, one dtype; results in scratch/")
    p.add_argument("--only", choices=list(GROUPS), nargs="+",
                   help="these groups of rows: text (alpaca_en_demo on a Llama), vl (mllm_demo on a tiny LLaVA), "
                        "video (mllm_video_demo on a tiny Qwen2-VL), vl_qwen2 (mllm_demo on it); default all")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="run every variant N times, round after round, and keep each one's fastest run (best-of-N: "
                        "on a machine others use too)")
    p.add_argument("--variants", nargs="+", metavar="TEXT",
                   help="only the variants whose name contains one of these (e.g. \"no packing, LoRA\")")
    p.add_argument("--steps", type=int, help="steps per variant (default 30; 3 with --quick)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default fp32, and bf16 where the CPU computes "
                                                                      "it natively (--quick: lf's auto dtype)")
    p.add_argument("--worker", nargs=3, metavar=("SYSTEM", "CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    groups = args.only or list(GROUPS)
    missing = [DATA_DIR / f"{GROUPS[g].dataset}.json" for g in groups
               if not (DATA_DIR / f"{GROUPS[g].dataset}.json").is_file()]
    if missing:
        print(f"bench.train_e2e: needs {', '.join(map(str, missing))} (LLaMA-Factory's demo data, in shared/ beside "
              f"the repository); not there, so nothing was run", file=sys.stderr)
        return 1

    import torch

    from bench import e2e_model
    from lf.model.options import choose_dtype

    native = choose_dtype("auto")[0] == torch.bfloat16  # lf's auto: bf16 where the CPU computes it natively
    dtypes = args.dtypes or (["bf16" if native else "fp32"] if args.quick else ["fp32"] + ["bf16"] * native)
    steps = args.steps or (3 if args.quick else 30)
    models = {g: getattr(e2e_model, GROUPS[g].model)(DATA_DIR / f"{GROUPS[g].dataset}.json") for g in groups}
    llamafactory, llamafactory_note = find_llamafactory()
    if not llamafactory:
        print(f"LLaMA-Factory rows left out: {llamafactory_note}", flush=True)
    runs = plan(dtypes, steps, models, llamafactory, args.variants) * args.repeats  # round after round: others' load hits all
    rows = {}  # (group, dtype, variant) -> its fastest run
    with tempfile.TemporaryDirectory() as tmp:
        for i, (group, dtype, name, system, config) in enumerate(runs):
            python = llamafactory if system == "llamafactory" else sys.executable
            try:
                r = run_variant(python, system, config, Path(tmp) / str(i))
            except RuntimeError as exc:
                if system != "llamafactory":
                    raise RuntimeError(f"{dtype} {name} failed: {exc}") from None
                print(f"[{i + 1}/{len(runs)}] {dtype} {name}: FAILED, left out: {exc}", flush=True)
                llamafactory_note += f"; {dtype} {name} failed: {str(exc).strip().splitlines()[-1]}"
                continue
            r.update(group=group, dtype=dtype, variant=name, system=system, settings=config,
                     final_loss=r["curve"][-1][2], tokens_per_s=r["tokens"] / r["seconds"],
                     load_1min=os.getloadavg()[0])  # others' load too
            earlier = rows.get((group, dtype, name))
            r["tokens_per_s_runs"] = (earlier["tokens_per_s_runs"] if earlier else []) + [r["tokens_per_s"]]
            r["peak_rss_mib_runs"] = (earlier["peak_rss_mib_runs"] if earlier else []) + [r["peak_rss_mib"]]
            if earlier is None or r["tokens_per_s"] > earlier["tokens_per_s"]:
                rows[group, dtype, name] = r
            else:
                earlier.update(tokens_per_s_runs=r["tokens_per_s_runs"], peak_rss_mib_runs=r["peak_rss_mib_runs"])
            print(f"[{i + 1}/{len(runs)}] {dtype} {name}: {r['steps']} steps, {r['tokens']:,} tokens, "
                  f"{r['tokens_per_s']:,.0f} tokens/s, peak RSS {r['peak_rss_mib']:,.0f} MiB "
                  f"(+{r['peak_above_baseline_mib']:,.0f} above baseline), final loss {r['final_loss']:.3f}, "
                  f"{r['wall_seconds']:.0f} s, load average {r['load_1min']:.1f}", flush=True)

    rows = list(rows.values())
    parts = ["python -m bench.train_e2e"] + ["--quick"] * args.quick + (["--only", *args.only] if args.only else [])
    parts += ["--variants", *(f'"{v}"' for v in args.variants)] if args.variants else []
    parts += [f"--steps {args.steps}"] * bool(args.steps) + (["--dtypes", *args.dtypes] if args.dtypes else [])
    command = " ".join(parts + [f"--repeats {args.repeats}"] * (args.repeats > 1))
    date = datetime.date.today().isoformat()
    name = "-".join([NAME, *args.only]) if args.only else NAME  # a part alone is not `lf bench`'s latest train_e2e
    png = harness.results_folder(args.quick) / f"{date}-{name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, dtypes, groups, png)
    facts = harness.machine_facts()
    intro = (f"{facts['cpu_model']}, {facts['cores']} cores ({facts['torch_threads']} torch threads), lf ISA "
             f"{facts['lf_isa']}, torch {facts['torch']}, transformers {facts['transformers']}. `{command}`.\n\n"
             f"LoRA r8 all-linear, lr 2e-3 cosine, {steps} steps; each variant in its own process"
             f"{f', run {args.repeats} times round after round, its fastest run kept' if args.repeats > 1 else ''}; "
             f"{', '.join(UNUSED_ON_CPU)} hidden from both systems' processes (bitsandbytes not from QLoRA's). "
             f"LLaMA-Factory: {llamafactory_note}. 1-minute load average during the runs: "
             f"{min(r['load_1min'] for r in rows):.1f}-{max(r['load_1min'] for r in rows):.1f}.")
    method = ("Tokens: real (non-padding) tokens trained on (a VL row's image tokens included); tokens/s over the "
              "trainer's on_train_begin..on_train_end. Peak RSS: the child's VmHWM over its whole life; peak above "
              "baseline: VmHWM during training (reset at on_train_begin) minus VmRSS then. See the module docstring "
              "for how each system is counted.")
    md = [f"# lf train end to end: {harness.device_name()}", "", intro, "", method]
    for group in groups:
        for dtype in dtypes:
            md += ["", f"## {GROUPS[group].dataset}, {dtype}", "", f"Model `{models[group].name}`: "
                   f"{GROUPS[group].about}.", ""] + table(rows, dtype, group=group)
    md += ["", f"Loss against tokens trained on: ![loss curves]({png.name})"]
    text = "\n".join(md) + "\n"
    print("\n" + text)
    summary = "\n\n".join("\n".join(table(rows, dtype, compact=True, group=group))
                           for group in groups for dtype in dtypes)
    harness.write_report(name, text, {"date": harness.now(), "command": command, "machine": facts,
                                      "llamafactory": llamafactory_note, "summary_md": summary,
                                      "charts": [str(png.relative_to(REPO))], "rows": rows}, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
