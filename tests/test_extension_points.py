"""The one place docs/DESIGN.md names for adding a template or a device is enough: a toy entry added there (and
taken out after the test) is used by the code that reads the table. (A toy stage: tests/test_stages.py; a toy patch
kind: tests/test_patch_table.py.)"""

import json
import types
from pathlib import Path

import torch

from lf.config import DataArguments
from lf.data import get_dataset, get_template, templates
from lf.kernels import _backend, rms_norm, rms_norm_reference
from lf.tiny import train_tokenizer

DATA = Path(__file__).resolve().parent.parent / "data"


def test_a_template_is_one_registry_entry(monkeypatch):
    toy = templates.Template("toy", user="Q: {content}\nA: ", assistant="{content}{eos}", separator="\n")
    monkeypatch.setitem(templates._REGISTRY, "toy", toy)  # the table entry a new template adds
    records = json.loads((DATA / "lf_demo_en.json").read_text())
    tokenizer = train_tokenizer([r["instruction"] + " " + r["output"] for r in records], vocab_size=400)
    template = get_template("toy")
    template.prepare_tokenizer(tokenizer)
    data = get_dataset(DataArguments(dataset="lf_demo_en", dataset_dir=str(DATA), cutoff_len=1024, max_samples=2),
                       tokenizer=tokenizer, template=template, stage="sft")
    row = data.train_dataset[0]
    text = tokenizer.decode(row["input_ids"])
    first = records[0]
    assert text.startswith("Q: ") and "\nA: " in text, text
    reply = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert reply.replace(" ", "") == (first["output"] + tokenizer.eos_token).replace(" ", "")


def test_a_device_is_one_backend_table_entry(monkeypatch):
    """Mapping a device type to a backend in DEFAULT_BACKEND is all the ops' dispatch reads: here the CPU is
    pointed at the torch reference, and rms_norm on CPU tensors runs it."""
    import importlib

    op = importlib.import_module("lf.kernels.rms_norm")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert op.FORWARD.for_device(torch.device("cpu")) is op._cpu_forward
    table = types.MappingProxyType({**_backend.DEFAULT_BACKEND, "cpu": "torch"})
    monkeypatch.setattr(_backend, "DEFAULT_BACKEND", table)
    assert _backend.choose_backend("cpu") == "torch"
    assert op.FORWARD.for_device(torch.device("cpu")) is op._torch_forward
    x, w = torch.randn(3, 20), torch.randn(20)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    assert _backend.choose_backend("npu") == "torch"  # a device without an entry runs the torch reference
