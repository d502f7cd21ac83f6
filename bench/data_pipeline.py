"""The data pipeline: padding with and without packing, and the time to prepare 100k records.

    python -m bench.data_pipeline            # alpaca_en_demo at cutoff 1024; 100k synthetic alpaca records
    python -m bench.data_pipeline --quick    # 5k synthetic records (smoke)

Padding: alpaca_en_demo.json (../shared/data, else lf's data/lf_demo_en.json) through the `default` template and
a byte-level BPE tokenizer (vocabulary 8000) trained on the same records; the share of token slots that are padding
when each example fills a row of `cutoff_len` alone, when batches of 4 examples in random order are padded to
their longest (HF Trainer's default sampler), and when examples are packed (best-fit decreasing) into rows of
`cutoff_len` (full rows, and batches of 4 rows padded to their longest).
Speed: synthetic alpaca records (instructions, inputs and outputs of the demo records recombined) written to a
JSON file, then `lf.data.get_dataset` for sft with neat packing, end to end (read, convert, template, tokenize,
pack), with 1 and 2 preprocessing workers. Writes bench/results/<device>/<date>-data_pipeline.{json,md}
(scratch/ for --quick).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from bench import harness

ROOT = Path(__file__).resolve().parent.parent
SHARED_ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
OWN_ALPACA = ROOT / "data" / "lf_demo_en.json"
CUTOFF, BATCH = 1024, 4


def _records() -> tuple[list[dict], str]:
    path = SHARED_ALPACA if SHARED_ALPACA.exists() else OWN_ALPACA
    return json.loads(path.read_text()), path.name


def _tokenizer(records):
    from lf.tiny import train_tokenizer

    texts = (" ".join(r.get(k, "") for k in ("instruction", "input", "output")) for r in records)
    return train_tokenizer(texts, vocab_size=8000)


def _write_dataset(folder: Path, name: str, records: list[dict]) -> None:
    (folder / f"{name}.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json"}}))


def _prepare(folder: Path, name: str, tokenizer, *, packing: bool, workers: int | None = None):
    from lf.config import DataArguments
    from lf.data import get_dataset, get_template

    args = DataArguments(dataset=name, dataset_dir=str(folder), cutoff_len=CUTOFF, packing=packing,
                         preprocessing_num_workers=workers, template="default")
    template = get_template("default")
    template.prepare_tokenizer(tokenizer)
    return get_dataset(args, tokenizer=tokenizer, template=template, stage="sft").train_dataset


def padding(records, tokenizer, folder: Path) -> dict:
    from lf.data.packing import padding_fraction
    from lf.data.pipeline import _lengths

    _write_dataset(folder, "demo", records)
    lengths = _lengths(_prepare(folder, "demo", tokenizer, packing=False))
    packed = _lengths(_prepare(folder, "demo", tokenizer, packing=True))
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    batches = [[lengths[i] for i in order[s:s + BATCH]] for s in range(0, len(order), BATCH)]
    packed_batches = [packed[s:s + BATCH] for s in range(0, len(packed), BATCH)]

    def batch_padding(groups):
        return 1 - sum(map(sum, groups)) / sum(len(g) * max(g) for g in groups)

    return {
        "examples": len(lengths), "tokens": sum(lengths), "packed_rows": len(packed),
        "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
        "rows_of_cutoff_unpacked": padding_fraction(lengths, len(lengths), CUTOFF),
        "batches_of_4_unpacked": batch_padding(batches),
        "rows_of_cutoff_packed": padding_fraction(packed, len(packed), CUTOFF),
        "batches_of_4_packed": batch_padding(packed_batches),
    }


def synthetic(records, n: int, seed: int = 0) -> list[dict]:
    """n alpaca records recombined from the demo's fields, each made unique by its number."""
    rng = random.Random(seed)
    pick = [[r.get(k, "") for r in records] for k in ("instruction", "input", "output")]
    return [{"instruction": f"{rng.choice(pick[0])} (#{i})", "input": rng.choice(pick[1]),
             "output": rng.choice(pick[2])} for i in range(n)]


def speed(records, tokenizer, folder: Path, n: int) -> list[dict]:
    _write_dataset(folder, "synthetic", synthetic(records, n))
    rows = []
    for workers in (None, 2):
        start = time.perf_counter()
        dataset = _prepare(folder, "synthetic", tokenizer, packing=True, workers=workers)
        seconds = time.perf_counter() - start
        rows.append({"records": n, "workers": workers or 1, "seconds": seconds, "records_per_s": n / seconds,
                     "packed_rows": len(dataset)})
        print(f"{n} records, {workers or 1} worker(s): {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    records, source = _records()
    tokenizer = _tokenizer(records)
    with tempfile.TemporaryDirectory() as tmp:
        pad = padding(records, tokenizer, Path(tmp))
        timing = speed(records, tokenizer, Path(tmp), 5_000 if args.quick else 100_000)
    device = harness.device_name()
    command = "python -m bench.data_pipeline" + (" --quick" if args.quick else "")
    pct = {k: f"{100 * v:.1f}%" for k, v in pad.items() if k.startswith(("rows", "batches"))}
    md = [f"# Data pipeline: {device}", "", f"`{command}`", "",
          f"## Padding, {source} at cutoff {CUTOFF}", "",
          f"{pad['examples']} examples, {pad['tokens']:,} tokens (mean {pad['mean_tokens']:.0f}, longest "
          f"{pad['max_tokens']}), template `default`, BPE vocabulary 8000 trained on the records; packed into "
          f"{pad['packed_rows']} rows.", "",
          "| layout | padding |", "|---|--:|",
          f"| one example per row of {CUTOFF} | {pct['rows_of_cutoff_unpacked']} |",
          f"| batches of {BATCH} examples (random order) padded to their longest | {pct['batches_of_4_unpacked']} |",
          f"| packed rows of {CUTOFF} | {pct['rows_of_cutoff_packed']} |",
          f"| batches of {BATCH} packed rows padded to their longest | {pct['batches_of_4_packed']} |", "",
          "## Time to prepare synthetic alpaca records (sft, neat packing, cutoff 1024)", "",
          "| records | workers | seconds | records/s | packed rows |", "|--:|--:|--:|--:|--:|"]
    md += [f"| {r['records']:,} | {r['workers']} | {r['seconds']:.1f} | {r['records_per_s']:,.0f} | "
           f"{r['packed_rows']:,} |" for r in timing]
    text = "\n".join(md) + "\n"
    print(text)
    harness.write_report("data_pipeline", text, {"command": command, "machine": harness.machine_facts(),
                                                    "padding": pad, "speed": timing}, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
