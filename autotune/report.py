"""The `tilefuse tune` report: JSON (one row per site and kernel family, with every trial), then an
optimization-history plot per measured row when matplotlib is installed."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from tilefuse.costmodel.hardware import GPUSpec

from .search import TuneOutcome, TuneSettings, summary_row


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
    if not any(row.get("trials") and row.get("source") != "model" for row in report["sites"]):
        notes.append("no measured trials: optimization-history plots are drawn for measured searches only")
    return notes
