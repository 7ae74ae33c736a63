"""Writers for a suite's result: JSON (records + environment, the source of truth), a markdown table rendered from
it, and PNG plots when matplotlib is installed."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger("tilefuse.benchmarks")
_ENV_LINE = ("device", "gpu", "driver_version", "smi_clocks_sm", "smi_clocks_max_sm", "torch", "triton", "tilefuse",
             "git_commit", "date", "host")  # fmt: skip


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _cell(record: dict[str, Any], metric: str) -> str:
    if record["status"] != "ok":
        return record["status"]
    metrics = record["metrics"]
    value = metrics.get(metric, next((v for k, v in metrics.items() if k != "peak_mem_gib"), None))
    timing = f" ({record['median_ms']:.3g} ms)" if record.get("median_ms") else ""
    return f"{_fmt(value)}{timing}"


def _pivot(records: list[dict[str, Any]], metric: str) -> list[str]:
    contenders = list(dict.fromkeys(r["contender"] for r in records))
    by_case: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        by_case[r["case"]][r["contender"]] = r
    header = ["case", *contenders, "tilefuse vs best peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case, row in by_case.items():
        cells = [_cell(row[c], metric) if c in row else "" for c in contenders]
        leads = [r for c, r in row.items() if c.startswith("tilefuse") and r.get("speedup_vs_best_peer")]
        ratio = f"{leads[0]['speedup_vs_best_peer']:.2f}x ({leads[0]['best_peer']})" if leads else "-"
        lines.append("| " + " | ".join([case, *cells, ratio]) + " |")
    return lines


def _metrics_table(records: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for r in records for k in r["metrics"]))
    header = ["case", "contender", "status", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        values = [_fmt(r["metrics"].get(k)) for k in keys]
        lines.append("| " + " | ".join([r["case"], r["contender"], r["status"], *values]) + " |")
    return lines


def _failures(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, list[str]] = defaultdict(list)
    for r in records:
        if r["status"] != "ok":
            seen[f"{r['contender']}: {r['status']}: {r['reason']}"].append(r["case"])
    return [f"- {why} ({len(cases)} case{'s' * (len(cases) > 1)}, e.g. `{cases[0]}`)" for why, cases in seen.items()]


def markdown(result: dict[str, Any]) -> str:
    env, records, metric = result["env"], result["records"], result["metric"]
    lines = [f"# {result['suite']} benchmark{' (tiny)' if result['config'].get('tiny') else ''}", ""]
    lines.append(" · ".join(f"{k}: {env[k]}" for k in _ENV_LINE if env.get(k) is not None))
    timed = any(r.get("median_ms") for r in records)
    cells = f"Cells: {metric} (median ms)" if timed else "Metrics per record"
    lines += ["", f"{cells}; elapsed {result['elapsed_s']:.0f} s.", ""]
    lines += _pivot(records, metric) if timed else _metrics_table(records)
    failures = _failures(records)
    if failures:
        lines += ["", "Not timed:", *failures]
    if result["notes"]:
        lines += ["", "Notes:", *(f"- {n}" for n in result["notes"])]
    return "\n".join(lines) + "\n"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    path.write_text(markdown(result))


def _series(records: list[dict[str, Any]], x_axis: str, metric: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """series -> contender -> [(x, metric)] over ok records."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        x, y = r["params"].get(x_axis), r["metrics"].get(metric)
        if r["status"] == "ok" and isinstance(x, int | float) and y is not None:
            out[str(r["params"].get("series", ""))][r["contender"]].append((float(x), float(y)))
    return {s: c for s, c in out.items() if any(len(points) > 1 for points in c.values())}


def write_plot(result: dict[str, Any], path: Path, max_panels: int = 24) -> bool:
    """One panel per series, one line per contender; False (and a logged note) when nothing can be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plot for %s", result["suite"])
        return False
    series = _series(result["records"], result["x_axis"], result["metric"])
    if not series:
        log.info("%s: fewer than two points per line, no plot", result["suite"])
        return False
    names = list(series)[:max_panels]
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for contender, points in series[name].items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=contender)
        ax.set_xscale("log", base=2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(result["x_axis"])
        ax.set_ylabel(result["metric"])
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(f"{result['suite']} · {result['env'].get('gpu') or result['env'].get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Re-render the markdown (and plot) of result JSON files: `python -m tilefuse.benchmarks.report FILE.json ...`."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in args.files:
        result = json.loads(path.read_text())
        write_markdown(result, path.with_suffix(".md"))
        write_plot(result, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
