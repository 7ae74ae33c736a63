"""The `tilefuse tune` report: JSON (one row per site and kernel family, with every trial and the knobs'
importances), then an optimization-history and a knob-importance plot per measured row when matplotlib is
installed."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from tilefuse.codegen.tile_config import PARAMS
from tilefuse.costmodel.hardware import GPUSpec

from .search import TuneOutcome, TuneSettings, summary_row


def knob_importances(trials: list[dict[str, Any]]) -> dict[str, float]:
    """How much of the spread of log latency over the measured trials each knob explains: the variance of the
    per-value mean log latency over the total variance (a one-way ANOVA per knob, fANOVA's first-order term for
    a grid), normalized to sum to 1. Knobs with one measured value, and rows with fewer than 3 measured trials,
    get nothing."""
    measured = [(t["config"], math.log(t["latency_us"]["p50"])) for t in trials
                if t.get("status") == "ok" and (t.get("latency_us") or {}).get("p50")]  # fmt: skip
    if len(measured) < 3:
        return {}
    values = [v for _, v in measured]
    mean = sum(values) / len(values)
    total = sum((v - mean) ** 2 for v in values)
    if total <= 0:
        return {}
    explained: dict[str, float] = {}
    for name in PARAMS:
        groups: dict[int, list[float]] = {}
        for config, value in measured:
            groups.setdefault(int(config.get(name, 0)), []).append(value)
        if len(groups) > 1:
            explained[name] = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values()) / total
    norm = sum(explained.values())
    return {name: share / norm for name, share in explained.items()} if norm > 0 else {}


def tune_report(args: argparse.Namespace, gpu: GPUSpec, settings: TuneSettings, jobs: list[tuple[str, Any, str]],
                outcomes: list[TuneOutcome | Exception]) -> dict[str, Any]:  # fmt: skip
    """`jobs`: (node, Spec, kernel family) per row, in the order of `outcomes`."""
    rows = []
    for (node, spec, kernel), outcome in zip(jobs, outcomes, strict=True):
        row: dict[str, Any] = {"node": node, "kind": spec.kind, "kernel": kernel, "spec": spec.to_dict()}
        if isinstance(outcome, Exception):
            row["error"] = f"{type(outcome).__name__}: {outcome}"
        else:
            row.update(summary_row(outcome), error=None)
            row["importances"] = knob_importances(row.get("trials", []))
        rows.append(row)
    notes = [] if rows else ["the model has no fused site to tune"]
    if settings.mode == "model":
        notes.append("mode model: latencies are the analytic cost model's predictions, not measurements")
    return {
        "model": args.model, "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "gpu": gpu.name,
        "arch": gpu.arch, "mode": settings.mode, "budget": settings.budget, "workers": settings.workers,
        "sites": rows, "notes": notes,
    }  # fmt: skip


def write_report(report: dict[str, Any], outcomes: list[TuneOutcome | Exception], out: Path) -> list[str]:
    """Write report.json and the plots under `out`; returns notes about what was skipped."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib is not installed: no optimization-history plots (pip install matplotlib)"]
    notes = []
    for index, row in enumerate(report["sites"]):
        latencies = [t["latency_us"].get("p50") for t in row.get("trials", []) if t["status"] == "ok"]
        if not latencies:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        best = [min(latencies[: i + 1]) for i in range(len(latencies))]
        ax.plot(range(1, len(latencies) + 1), latencies, "o", label="measured (median)")
        ax.plot(range(1, len(best) + 1), best, "-", label="best so far")
        default = row.get("default_latency_us")
        if default is not None and math.isfinite(default):
            ax.axhline(default, linestyle="--", color="gray", label="default config")
        ax.set(xlabel="trial", ylabel="latency (µs)", title=f"{row['node']} ({row['kernel']})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"history_{index:02d}_{row['node']}_{row['kernel']}.png", dpi=100)
        plt.close(fig)
        importances = row.get("importances") or {}
        if importances:
            fig, ax = plt.subplots(figsize=(5, 2.8))
            names = sorted(importances, key=importances.__getitem__)
            ax.barh(names, [importances[n] for n in names])
            ax.set(xlabel="share of log-latency variance explained", title=f"{row['node']} ({row['kernel']})")
            fig.tight_layout()
            fig.savefig(out / f"importance_{index:02d}_{row['node']}_{row['kernel']}.png", dpi=100)
            plt.close(fig)
    if not any(row.get("trials") and row.get("source") != "model" for row in report["sites"]):
        notes.append("no measured trials: history and importance plots are drawn for measured searches only")
    return notes
