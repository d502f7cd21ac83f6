"""`lf bench` (bench/suite.py) writes its report when a benchmark or one of its baselines fails: the failure is
named in the report and the exit code, and every other result is still there."""

import json

import pytest

from bench import suite


def qlora_result(baseline_failed: bool) -> dict:
    """A qlora_linear result of one group: lf measured, PEFT + bitsandbytes measured or failed in its child."""
    rows, totals = [], []
    for variant, failed in (("peft_bnb", baseline_failed), ("lf", False)):
        status = "failed (exit code 1) during setup" if failed else "ok"
        rows.append({"dtype": "bf16", "group": "mlp", "variant": variant, "status": status, "projections": [],
                     "shapes": ["up_proj"]})
        for group in ("mlp", "all"):
            totals.append({"dtype": "bf16", "group": group, "variant": variant, "fwd_ms": None if failed else 4.0,
                           "fwd_bwd_ms": None if failed else 9.0, "extra_peak_mib": None if failed else 3.0,
                           "speedup_vs_peft_bnb": None if baseline_failed else 1.0,
                           "memory_vs_peft_bnb": None if baseline_failed else 1.0})
    return {"rows": rows, "totals": totals, "problems": []}


def test_qlora_summary_of_a_failed_baseline_says_so():
    table = suite.summary("qlora_linear", qlora_result(baseline_failed=True))
    assert "| mlp | bf16 | 9.00 | n/a | n/a | n/a |" in table
    assert "Failed: peft_bnb (bf16, mlp): failed (exit code 1) during setup." in table
    assert "Failed" not in suite.summary("qlora_linear", qlora_result(baseline_failed=False))


def test_a_benchmark_whose_child_fails_is_reported_and_the_rest_written(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "results_folder", lambda quick: tmp_path)
    monkeypatch.setattr(suite, "REPO", tmp_path)
    broken = suite.Benchmark("ops", "Kernels", ("bench.no_such_benchmark",))
    why = suite.run_benchmark(broken, quick=True, started=0.0)
    assert why.startswith("`-m bench.no_such_benchmark --quick` exited with 1 and wrote no ")

    written = tmp_path / "qlora.json"
    written.write_text(json.dumps({**qlora_result(baseline_failed=True), "command": "python -m bench qlora-linear"}))
    outcomes = {"ops": why, "qlora_linear": written}
    monkeypatch.setattr(suite, "run_benchmark", lambda bench, quick, started: outcomes[bench.name])
    monkeypatch.setattr(suite, "update_readme", lambda: pytest.fail("a failed run must leave the README alone"))
    assert suite.main(["ops"]) == 1
    [report] = tmp_path.glob("*-lf-bench-ops.md")
    text = report.read_text()
    assert "**Failed:** ops: `-m bench.no_such_benchmark --quick` exited with 1" in text
    assert "### QLoRA linear vs PEFT + bitsandbytes" in text and "| mlp | bf16 | 9.00 | n/a |" in text
    assert json.loads(report.with_suffix(".json").read_text())["failed"] == {"ops": why}
