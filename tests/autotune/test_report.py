"""The `tilefuse tune` report of a measured search: every trial in JSON, the knobs' importances (a one-way ANOVA of
log latency per knob), and the history and importance plots."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from tilefuse.autotune.report import knob_importances, tune_report, write_report
from tilefuse.autotune.search import TuneSettings, tune_spec
from tilefuse.codegen.plan import TileConfig
from tilefuse.costmodel.hardware import get_gpu
from tilefuse.costmodel.measure import Measurement
from tilefuse.specs import NormSpec, Spec

H100 = get_gpu("h100")
SPEC = NormSpec("rmsnorm", 4096, (8192, 4096), "bfloat16", 1e-6, out_dtype="bfloat16")


def warps_matter(spec: Spec, config: TileConfig) -> Measurement:
    """Test-only latency: only num_warps changes it (8 warps best)."""
    us = 10.0 * (1 + abs(math.log2(config.num_warps / 8)))
    return Measurement.ok(us, us * 0.99, us * 1.01)


def test_importances_credit_the_knob_that_moves_latency() -> None:
    trials = [{"config": {"block_m": 64, "num_warps": w, "num_splits": s}, "status": "ok",
               "latency_us": {"p50": 10.0 * w}} for w in (1, 2, 4) for s in (32, 64)]  # fmt: skip
    importances = knob_importances(trials)
    assert set(importances) == {"num_warps", "num_splits"}
    assert importances["num_warps"] == pytest.approx(1.0) and importances["num_splits"] == pytest.approx(0.0)
    assert knob_importances(trials[:2]) == {}  # too few measured trials to say anything


def test_measured_report_has_trials_importances_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    outcome = tune_spec(SPEC, H100, TuneSettings(mode="exhaustive"), kind="norm_backward", measure=warps_matter)
    args = argparse.Namespace(model="test", batch=1, seq=8192, dtype="bfloat16")
    report = tune_report(args, H100, TuneSettings(mode="exhaustive"), [("norm_0", SPEC, "norm_backward")], [outcome])
    (row,) = report["sites"]
    assert len(row["trials"]) == len(outcome.record.trials)
    assert max(row["importances"], key=row["importances"].__getitem__) == "num_warps"
    assert write_report(report, [outcome], tmp_path) == []
    assert json.loads((tmp_path / "report.json").read_text())["sites"][0]["importances"] == row["importances"]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["history_00_norm_0_norm_backward.png", "importance_00_norm_0_norm_backward.png"]
