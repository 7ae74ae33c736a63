"""The README's performance table, generated from committed GPU result files (never typed by hand).

`python -m tilefuse.benchmarks.readme_table benchmarks/results/<gpu>/*.json [--write README.md]` prints the table
(one row per headline case: tilefuse's metric, its ratio to each peer measured in the same run, and the issue's
target with the margin by which it is met or missed) and, with --write, replaces the README's text between
`<!-- perf-table:start -->` and `<!-- perf-table:end -->`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
TILEFUSE = "tilefuse"


@dataclass(frozen=True)
class Target:
    """tilefuse must reach `value` in `metric` (a metric of the record, or "vs <peer>": the peer's median over
    tilefuse's; "vs best" for the fastest other contender)."""

    metric: str
    value: float

    def describe(self) -> str:
        return f"{self.metric} ≥ {self.value:g}"


def _attention_targets(record: dict[str, Any]) -> list[Target]:
    p = record["params"]
    if p.get("mode") != "fwd" or p.get("dtype") != "bfloat16" or p.get("head_dim") != 128 or p["kv_len"] < 2048:
        return []
    if p.get("variant") in ("full", "causal"):
        targets = [Target("vs flex", 1.1), Target("vs sdpa", 1.0)]
        return targets + ([Target("tflops", 600.0)] if p["kv_len"] >= 4096 else [])
    return [Target("vs best", 1.3)]  # fused variants against the best peer composition


def _norm_targets(record: dict[str, Any]) -> list[Target]:
    if record["params"].get("mode") == "copy":
        return []
    return [Target("copy_fraction", 0.9), Target("vs liger", 1.0), Target("vs compile", 1.0)]


def _e2e_targets(record: dict[str, Any]) -> list[Target]:
    return [Target("vs inductor", 1.15)] if record["params"].get("mode") == "train" else []


TARGETS: dict[str, Callable[[dict[str, Any]], list[Target]]] = {
    "attention": _attention_targets, "norms": _norm_targets, "e2e": _e2e_targets,
}  # fmt: skip
HEADLINE = {  # which tilefuse cases of each suite make the README (the full tables sit beside the JSON)
    "attention": lambda r: r["params"].get("dtype") == "bfloat16" and r["params"].get("head_dim") == 128,
    "decode": lambda r: True,
    "norms": lambda r: True,
    "e2e": lambda r: True,
    "tuning": lambda r: True,
}


def _peer_ratio(case: list[dict[str, Any]], mine: dict[str, Any], peer: str) -> float | None:
    """The peer's median time over tilefuse's (> 1: tilefuse is faster), both from one case of one run."""
    if peer == "best":
        return mine.get("speedup_vs_best_peer")
    other = next((r for r in case if r["contender"] == peer and r["status"] == "ok"), None)
    if other is None or not other.get("median_ms") or not mine.get("median_ms"):
        return None
    return float(other["median_ms"]) / float(mine["median_ms"])


def _value(case: list[dict[str, Any]], mine: dict[str, Any], metric: str) -> float | None:
    if metric.startswith("vs "):
        return _peer_ratio(case, mine, metric[3:])
    value = (mine.get("metrics") or {}).get(metric)
    return None if value is None else float(value)


def rows(results: Sequence[tuple[str, dict[str, Any]]], limiters: dict[str, str] | None = None) -> list[list[str]]:
    """[suite, case, metric, vs best peer, targets] per headline tilefuse record of the (file name, result) pairs;
    a missed target is followed by what Nsight Compute said limits that case's tilefuse kernel (`limiters`: case
    name -> verdict, from ncu_profile.py's profile.json), when it was profiled."""
    out = []
    for name, result in results:
        suite, metric = result["suite"], result["metric"]
        by_case: dict[str, list[dict[str, Any]]] = {}
        for record in result["records"]:
            by_case.setdefault(record["case"], []).append(record)
        for case_name, case in by_case.items():
            mine = next((r for r in case if r["contender"] == TILEFUSE), None)
            if mine is None or not HEADLINE.get(suite, lambda r: False)(mine):
                continue
            if mine["status"] != "ok":
                out.append([suite, case_name, f"{mine['status']}: {mine.get('reason') or ''}"[:60], "", "", name])
                continue
            value = _value(case, mine, metric)
            best = mine.get("speedup_vs_best_peer")
            verdicts = []
            for target in TARGETS.get(suite, lambda r: [])(mine):
                got = _value(case, mine, target.metric)
                if got is None:
                    verdicts.append(f"{target.describe()}: n/a")
                else:
                    verdict = "met" if got >= target.value else f"missed by {100 * (1 - got / target.value):.0f}%"
                    verdicts.append(f"{target.describe()}: {got:.3g} ({verdict})")
            if any("missed" in v for v in verdicts) and (limiters or {}).get(case_name):
                verdicts.append(f"ncu: {(limiters or {})[case_name]}")
            out.append([
                suite, case_name, "-" if value is None else f"{value:.4g} {metric}",
                "-" if best is None else f"{best:.2f}x {mine.get('best_peer')}", "; ".join(verdicts), name,
            ])  # fmt: skip
    return out


def table(results: Sequence[tuple[str, dict[str, Any]]], limiters: dict[str, str] | None = None) -> str:
    """The markdown table with a line naming the GPU and run date of the results."""
    envs = {(r["env"].get("gpu") or r["env"].get("device"), str(r["env"].get("date", ""))[:10]) for _, r in results}
    lines = ["Measured on " + ", ".join(f"{gpu} ({date})" for gpu, date in sorted(envs, key=str)) + "; ratios are "
             "peer time / tilefuse time from the same run (> 1: tilefuse faster).", "",
             "| suite | case | tilefuse | vs best peer | targets | source |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows(results, limiters)]
    if partial := sorted(name for name, r in results if r.get("partial")):
        lines += ["", f"Interrupted runs (not every case measured yet): {', '.join(partial)}."]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, body: str) -> None:
    """Replace the text between the perf-table markers; ValueError when they are missing."""
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    readme.write_text(pattern.sub(lambda _: f"{START}\n{body}{END}", text, count=1))


def load(paths: Sequence[Path]) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str]]:
    """Suite result files, and the tilefuse limiter per case from any profile file among `paths` (other JSON in a
    results folder, such as the GPU session's summary, is skipped)."""
    results, limiters = [], {}
    for path in paths:
        doc = json.loads(path.read_text())
        if "suite" in doc and "records" in doc:
            results.append((path.name, doc))
        for entry in doc.get("profiles", []):
            if entry.get("contender") == TILEFUSE and entry.get("status") == "ok" and entry.get("limiter"):
                limiters[entry["case"]] = entry["limiter"]
    return results, limiters


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files (benchmarks/results/<gpu>/*.json)")
    parser.add_argument("--write", type=Path, default=None, help="README to update between the markers")
    args = parser.parse_args(argv)
    results, limiters = load(args.results)
    body = table(results, limiters)
    if args.write is not None:
        update_readme(args.write, body)
    else:
        sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
