"""The README performance table: built only from result files, ratios taken within one case of one run, targets
reported as met or missed by how much, and written between the README's markers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tilefuse.benchmarks import readme_table


def _record(contender: str, median_ms: float, tflops: float, best: float | None = None) -> dict[str, Any]:
    params = {"mode": "fwd", "dtype": "bfloat16", "head_dim": 128, "kv_len": 4096, "variant": "causal"}
    return {"case": "fwd bf16 d128 N4096 causal", "contender": contender, "status": "ok", "median_ms": median_ms,
            "params": params, "metrics": {"tflops": tflops}, "speedup_vs_best_peer": best,
            "best_peer": "sdpa"}  # fmt: skip


RESULT = {
    "suite": "attention", "metric": "tflops", "env": {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-12-01T10:00"},
    "records": [_record("tilefuse", 1.0, 650.0, 1.05), _record("sdpa", 1.05, 620.0), _record("flex", 1.0, 650.0)],
}  # fmt: skip


def test_rows_compare_within_the_case_and_judge_targets() -> None:
    ((suite, case, value, best, targets, source),) = readme_table.rows([("attention-fwd.json", RESULT)])
    assert (suite, case, value, best, source) == ("attention", "fwd bf16 d128 N4096 causal", "650 tflops",
                                                  "1.05x sdpa", "attention-fwd.json")  # fmt: skip
    assert "vs flex ≥ 1.1: 1 (missed by 9%)" in targets
    assert "vs sdpa ≥ 1: 1.05 (met)" in targets and "tflops ≥ 600: 650 (met)" in targets


def test_update_readme_replaces_only_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_table.START}\nold\n{readme_table.END}\nrest\n")
    body = readme_table.table([("attention-fwd.json", RESULT)])
    readme_table.update_readme(readme, body)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{readme_table.END}\nrest\n") and "old" not in text
    assert "NVIDIA H100 80GB HBM3 (2026-12-01)" in text and "| attention | fwd bf16 d128 N4096 causal |" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        readme_table.update_readme(readme, body)


def test_the_repository_readme_has_the_markers() -> None:
    text = (Path(readme_table.__file__).parents[1] / "README.md").read_text()
    assert text.count(readme_table.START) == 1 and text.count(readme_table.END) == 1


def test_missed_targets_quote_the_profile_and_other_json_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "attention-fwd.json").write_text(json.dumps({**RESULT, "partial": True}))
    (tmp_path / "gpu-session.json").write_text(json.dumps({"gpu": "x", "steps": []}))
    profile = {"profiles": [
        {"case": "fwd bf16 d128 N4096 causal", "contender": "tilefuse", "status": "ok", "limiter": "latency-bound: x"},
        {"case": "fwd bf16 d128 N4096 causal", "contender": "flex", "status": "ok", "limiter": "memory-bound: y"},
    ]}  # fmt: skip
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    results, limiters = readme_table.load(sorted(tmp_path.glob("*.json")))
    assert [name for name, _ in results] == ["attention-fwd.json"]
    assert limiters == {"fwd bf16 d128 N4096 causal": "latency-bound: x"}
    ((*_, targets, _source),) = readme_table.rows(results, limiters)
    assert targets.endswith("; ncu: latency-bound: x")
    assert "Interrupted runs (not every case measured yet): attention-fwd.json." in readme_table.table(results)
