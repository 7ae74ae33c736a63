"""Profile benchmark cases with Nsight Compute and say what limits each kernel.

    python -m tilefuse.benchmarks.ncu_profile SUITE/CASE[@CONTENDERS] ... [--contenders tilefuse,flex] [--out DIR]

For every case (suite and exact case name, as in the result tables, e.g. "attention/fwd bf16 d128 N8192 causal")
and contender (those after `@`, else --contenders), runs
``ncu --profile-from-start off`` around ``benchmarks/run.py SUITE --filter ^CASE$ --profile CONTENDER``, which
compiles and warms the contender up first and then calls it between cudaProfilerStart and Stop, so only the
contender's own kernels are profiled. The report is read back as CSV and reduced to `profile.json` in the results
folder: per kernel its duration, speed-of-light throughputs, occupancy, registers and shared memory, plus a
one-line `limiter` verdict — what a results file and a note quote when a target is missed. Needs a GPU and ncu.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from glob import glob
from pathlib import Path
from typing import Any

log = logging.getLogger("tilefuse.benchmarks")
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "ComputeWorkloadAnalysis",
            "MemoryWorkloadAnalysis")  # fmt: skip
SOL_BOUND = 60.0  # % of peak above which a unit counts as the limiter (ncu's own guidance uses 60 %)
KEPT = {  # metric name in ncu's details page -> key in our JSON
    "Duration": "duration",
    "Compute (SM) Throughput": "sm_throughput_pct",
    "Memory Throughput": "memory_throughput_pct",
    "DRAM Throughput": "dram_throughput_pct",
    "Achieved Occupancy": "achieved_occupancy_pct",
    "Theoretical Occupancy": "theoretical_occupancy_pct",
    "Registers Per Thread": "registers_per_thread",
    "Dynamic Shared Memory Per Block": "dynamic_smem_per_block",
    "Static Shared Memory Per Block": "static_smem_per_block",
    "Block Limit Registers": "block_limit_registers",
    "Block Limit Shared Mem": "block_limit_shared_mem",
    "Warp Cycles Per Issued Instruction": "warp_cycles_per_issue",
    "Issue Slots Busy": "issue_slots_busy_pct",
    "Executed Ipc Active": "ipc_active",
    "L1/TEX Hit Rate": "l1_hit_rate_pct",
    "L2 Hit Rate": "l2_hit_rate_pct",
    "Waves Per SM": "waves_per_sm",
}
TIME_UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def find_ncu() -> str:
    """ncu on PATH, else the newest one under the usual CUDA and Nsight Compute install folders."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob("/opt/nvidia/nsight-compute/*/ncu") + glob("/usr/local/cuda*/bin/ncu"))
    if not candidates:
        raise FileNotFoundError("Nsight Compute (ncu) is not installed here: profiling needs the GPU machine")
    return candidates[-1]


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_details_csv(text: str) -> list[dict[str, Any]]:
    """ncu's `--csv --page details` output -> one entry per profiled kernel launch, in launch order, with the
    metrics of KEPT (durations in µs) and every other metric under `all` ("Section / Metric": [value, unit])."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no ncu CSV header in the output (did the profiled program launch any kernel?)")
    kernels: dict[str, dict[str, Any]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        launch = row.get("ID", "")
        kernel = kernels.setdefault(launch, {
            "id": int(launch) if launch.isdigit() else launch, "kernel": row.get("Kernel Name", ""),
            "grid": row.get("Grid Size", ""), "block": row.get("Block Size", ""), "metrics": {}, "all": {},
        })  # fmt: skip
        name, unit, raw = row.get("Metric Name", ""), row.get("Metric Unit", ""), row.get("Metric Value", "")
        if not name:
            continue
        value = _number(raw)
        kernel["all"][f"{row.get('Section Name', '')} / {name}"] = [value if value is not None else raw, unit]
        if name in KEPT and value is not None and KEPT[name] not in kernel["metrics"]:
            if name == "Duration":
                value *= TIME_UNITS.get(unit, 1.0)
            kernel["metrics"][KEPT[name]] = value
    return list(kernels.values())


def limiter(metrics: dict[str, float]) -> str:
    """A one-line verdict from the speed-of-light figures: which unit is closest to its peak, and whether any is."""
    sm, mem = metrics.get("sm_throughput_pct"), metrics.get("memory_throughput_pct")
    occupancy = metrics.get("achieved_occupancy_pct")
    if sm is None or mem is None:
        return "unknown (no speed-of-light figures)"
    occ = f", achieved occupancy {occupancy:.0f}%" if occupancy is not None else ""
    if max(sm, mem) >= SOL_BOUND:
        unit = "compute (SM pipes)" if sm >= mem else "memory"
        return f"{unit}-bound: SM {sm:.0f}% / memory {mem:.0f}% of peak{occ}"
    return f"latency-bound: neither SM ({sm:.0f}%) nor memory ({mem:.0f}%) reaches {SOL_BOUND:.0f}% of peak{occ}"


def summarize(kernels: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(k["metrics"].get("duration", 0.0) for k in kernels)
    for kernel in kernels:
        kernel["limiter"] = limiter(kernel["metrics"])
        duration = kernel["metrics"].get("duration")
        kernel["share_of_time"] = duration / total if duration and total else None
    main = max(kernels, key=lambda k: k["metrics"].get("duration", 0.0)) if kernels else None
    return {
        "kernels": kernels,
        "total_duration_us": total,
        "main_kernel": main["kernel"] if main else None,
        "limiter": main["limiter"] if main else "no kernel was profiled",
    }


def profile_one(suite: str, case: str, contender: str, ncu: str, workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Profile one contender of one case; the entry records a failure instead of raising."""
    entry: dict[str, Any] = {"suite": suite, "case": case, "contender": contender}
    report = workdir / f"{re.sub(r'[^A-Za-z0-9]+', '-', case)}-{contender}"
    program = [sys.executable, "-m", "tilefuse.benchmarks.run", suite, "--filter", f"^{re.escape(case)}$",
               "--profile", contender]  # fmt: skip
    record = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--force-overwrite",
              "--export", str(report), *(a for s in SECTIONS for a in ("--section", s)), *program]  # fmt: skip
    try:
        run = subprocess.run(record, capture_output=True, text=True, timeout=timeout_s, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"ncu exited {run.returncode}: {(run.stderr or run.stdout).strip()[-600:]}")
        if not Path(f"{report}.ncu-rep").exists():  # the case has no such contender, or it launched nothing
            entry |= {"status": "unavailable", "reason": "no kernel was profiled: " + run.stdout.strip()[-300:]}
            return entry
        csv_text = subprocess.run([ncu, "--import", f"{report}.ncu-rep", "--csv", "--page", "details"],
                                  capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
        entry |= {"status": "ok", **summarize(parse_details_csv(csv_text))}
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as err:
        entry |= {"status": "error", "reason": f"{type(err).__name__}: {str(err)[:800]}"}
    log.info("%s / %s: %s", case, contender, entry.get("limiter", entry.get("reason")))
    return entry


def merge(path: Path, entries: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    """Add `entries` to the profile file at `path`, replacing earlier entries of the same case and contender."""
    doc: dict[str, Any] = {"schema": 1, "env": env, "sections": list(SECTIONS), "profiles": []}
    if path.exists():
        doc = json.loads(path.read_text())
    fresh = {(e["case"], e["contender"]) for e in entries}
    doc["profiles"] = [p for p in doc["profiles"] if (p["case"], p["contender"]) not in fresh] + entries
    doc["env"] = env
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="+", metavar="SUITE/CASE",
                        help="suite and exact case name, e.g. 'attention/fwd bf16 d128 N8192 causal'")  # fmt: skip
    parser.add_argument("--contenders", default="tilefuse", help="comma-separated contenders (default: tilefuse)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<gpu>/)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per profiled program")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    import torch

    from tilefuse.benchmarks.environment import environment, gpu_slug
    from tilefuse.benchmarks.run import RESULTS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ncu = find_ncu()
    except FileNotFoundError as err:
        log.error("%s", err)
        return 2
    out = args.out or RESULTS / gpu_slug(device)
    try:
        targets = [parse_target(t, args.contenders) for t in args.targets]
    except ValueError as err:
        parser.error(str(err))
    path, env = out / "profile.json", environment(device)
    with tempfile.TemporaryDirectory(prefix="tilefuse-ncu-") as tmp:
        for suite, case, contenders in targets:
            for contender in contenders:  # written one by one: a time limit keeps what was profiled
                merge(path, [profile_one(suite, case, contender, ncu, Path(tmp), args.timeout)], env)
    log.info("wrote %s", path)
    return 0


def parse_target(text: str, default_contenders: str) -> tuple[str, str, list[str]]:
    """'SUITE/CASE[@a,b]' -> (suite, case, contenders)."""
    target, _, contenders = text.partition("@")
    suite, slash, case = target.partition("/")
    if not slash or not suite or not case:
        raise ValueError(f"a target is SUITE/CASE[@CONTENDERS], got {text!r}")
    return suite, case, [c.strip() for c in (contenders or default_contenders).split(",") if c.strip()]


if __name__ == "__main__":
    sys.exit(main())
