"""Spend a short GPU lease on what only a GPU can do, most important first, and hand back one archive.

    python -m tilefuse.benchmarks.gpu_session --out DIR [--budget SECONDS] [--only STEP,...] [--list]

A lent GPU machine gives a session about 30 minutes in commands of at most 10, starts bare each time and returns
at most 8 files. This driver runs a fixed plan of steps (below) as child processes, each under the time left in the
budget, and after every step packs what the steps wrote — the benchmark result files under
``benchmarks/results/<gpu>/``, the measurement records under ``data/``, the GPU test log — into
``DIR/gpu-session.tar.gz`` (paths relative to the repository root) with a ``DIR/gpu-session.json`` summary.
Unpack the archive in the repository root and commit it; the next lease's copy of the working tree then holds it,
so finished steps are skipped and an interrupted benchmark resumes at its next case (``run.py --resume``) and an
interrupted collection at its next task (collection files are resumable).

`benchmarks/gpu_session.sh` installs the wheels the GPU image lacks and calls this; benchmarks/README.md has the
whole procedure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tilefuse.benchmarks.environment import gpu_slug
from tilefuse.benchmarks.run import result_stem

log = logging.getLogger("tilefuse.benchmarks")
REPO = Path(__file__).resolve().parent.parent
ARCHIVE = "gpu-session.tar.gz"
SUMMARY = "gpu-session.json"
RESERVE_S = 20.0  # kept back from the budget for packing the archive
MIN_STEP_S = 45.0  # a step is not started with less than this left


@dataclass(frozen=True)
class Step:
    """One unit of the plan. `bench`: benchmarks/run.py arguments (resumable, done once its JSON is final);
    `command`: any other command, done once `marker` exists (relative to the results folder)."""

    name: str
    why: str
    cap_s: float  # at most this long per call; an unfinished step continues in the next call
    bench: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    marker: str | None = None
    once: bool = False  # a command step that is not retried after its time limit (its log holds what it did)
    env: dict[str, str] = field(default_factory=dict)


CORE = "(full|causal)$"
VARIANTS = "(gqa|window|softcap|alibi|rope)$"
PROFILED = (  # benchmarks/ncu_profile.py targets: the README's headline cases
    "attention/fwd bf16 d128 N8192 causal@tilefuse,flex,sdpa",
    "attention/fwd bf16 d128 N8192 full@tilefuse",
    "attention/fwd+bwd bf16 d128 N8192 causal@tilefuse,flex",
    "attention/fwd bf16 d128 N8192 rope@tilefuse,tilefuse_prepass",
    "norms/fwd rmsnorm+residual 16384x4096@tilefuse,liger",
    "decode/decode bf16 d128 q1 kv65536@tilefuse",
)


def _bench(name: str, why: str, cap_s: float, *args: str) -> Step:
    return Step(name, why, cap_s, bench=args)


def plan(gpu: str, collect_jobs: int, root: Path = REPO) -> list[Step]:
    """The steps in order of importance: correctness on the GPU first (nothing else means anything if the kernels
    are wrong there), then the benchmark targets of the README, then cost-model data, which any leftover time
    extends."""
    python = sys.executable
    tests = (python, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-x", "-p", "no:cacheprovider")
    collect = (python, "-m", "tilefuse.compiler.cli", "costmodel", "collect", "--family", "all", "--shapes", "small")
    return [
        Step("gpu-tests", "compiled kernels and the backend checked against fp64 goldens on this GPU", 300,
             command=(*tests, "-rA", "--junitxml", "{results}/gpu-tests.xml"), marker="gpu-tests.xml",
             env={"TRITON_INTERPRET": "0"}, once=True),
        _bench("attention-fwd-core", "forward targets: bf16 d128, full and causal, N 512-16k", 360,
               "attention", "--filter", f"^fwd .* {CORE}", "--tag", "fwd-core"),
        _bench("attention-fwd-variants", "fused variants: GQA, window, softcap, ALiBi, RoPE", 300,
               "attention", "--filter", f"^fwd .* {VARIANTS}", "--tag", "fwd-variants"),
        _bench("norms", "norms and RoPE against copy bandwidth, Liger, torch.compile", 300, "norms"),
        _bench("decode", "split-KV decode against SDPA and FlexAttention", 240, "decode", "--cuda-graphs"),
        Step("profile", "Nsight Compute verdict on the main kernels and their closest peers", 240,
             command=(python, "-m", "tilefuse.benchmarks.ncu_profile", *PROFILED, "--out", "{results}"),
             marker="profile.done"),
        _bench("attention-bwd-core", "forward+backward, full and causal", 360,
               "attention", "--filter", rf"^fwd\+bwd .* {CORE}", "--tag", "bwd-core"),
        _bench("e2e-train", "Llama-1B-shaped training step", 420, "e2e", "--filter", "^train", "--tag", "train"),
        _bench("attention-bwd-variants", "forward+backward of the fused variants", 360,
               "attention", "--filter", rf"^fwd\+bwd .* {VARIANTS}", "--tag", "bwd-variants"),
        _bench("e2e-prefill", "Llama-1B-shaped prefill", 300, "e2e", "--filter", "^prefill", "--tag", "prefill"),
        _bench("tuning", "tilefuse tune wall time vs max-autotune", 420, "tuning"),
        Step("collect", "cost-model measurements, all kernel families (resumable; takes whatever time is left)",
             float("inf"), command=(*collect, "--jobs", str(collect_jobs), "--out", str(data_file(root, gpu))),
             marker="collect.done"),
    ]  # fmt: skip


def data_file(root: Path, gpu: str) -> Path:
    return root / "data" / f"{gpu}.jsonl.gz"


def results_folder(root: Path, gpu: str) -> Path:
    return root / "benchmarks" / "results" / gpu


def gpu_folder() -> str:
    return gpu_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _bench_done(results: Path, step: Step) -> bool:
    tag = step.bench[step.bench.index("--tag") + 1] if "--tag" in step.bench else None
    path = results / f"{result_stem(step.bench[0], tag, '--tiny' in step.bench)}.json"
    try:
        return not json.loads(path.read_text()).get("partial", True)
    except (OSError, ValueError):
        return False


def is_done(step: Step, results: Path) -> bool:
    if step.bench:
        return _bench_done(results, step)
    return step.marker is not None and (results / step.marker).exists()


def _argv(step: Step, results: Path) -> list[str]:
    if step.bench:
        return [sys.executable, "-m", "tilefuse.benchmarks.run", *step.bench, "--out", str(results), "--resume"]
    return [part.replace("{results}", str(results)) for part in step.command]


def run_step(step: Step, root: Path, results: Path, timeout_s: float) -> dict[str, Any]:
    """Run one step in its own process group, log to results/<step>.log, stop it (SIGINT, then SIGKILL) at the
    timeout. Returns its summary entry."""
    log_path = results / "logs" / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    with log_path.open("a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(_argv(step, results))}\n")
        out.flush()
        proc = subprocess.Popen(
            _argv(step, results), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(proc.pid, signal.SIGINT)  # lets a benchmark's last checkpoint and a collector's flush land
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = time.monotonic() - start
    finished = rc == 0 or (step.once and rc is None)  # `once`: a stopped run is not repeated on every call
    if finished and step.marker and not step.bench and not (results / step.marker).exists():
        what = "finished" if rc == 0 else "stopped at its time limit (see its log)"
        (results / step.marker).write_text(f"{what} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    state = "done" if rc == 0 else "stopped at its time limit" if rc is None else f"failed (exit {rc})"
    log.info("%s: %s after %.0f s (log: %s)", step.name, state, elapsed, log_path.relative_to(root))
    return {"step": step.name, "state": state, "elapsed_s": round(elapsed, 1), "log": str(log_path.relative_to(root))}


def pack(out: Path, root: Path, gpu: str, summary: dict[str, Any]) -> Path:
    """Everything the steps wrote, as one archive of repository-relative paths (the device returns few files)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    results = results_folder(root, gpu)
    (results / SUMMARY).write_text(json.dumps(summary, indent=1))
    archive = out / ARCHIVE
    partial = archive.with_suffix(".part")
    with tarfile.open(partial, "w:gz") as tar:
        for path in (results, data_file(root, gpu)):
            if path.exists():
                tar.add(path, arcname=str(path.relative_to(root)))
    partial.replace(archive)
    return archive


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the archive and summary go (the device's $OUT)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds this call may take in all")
    parser.add_argument("--only", help="comma-separated step names to run (default: the whole plan, in order)")
    parser.add_argument("--gpu", help="results folder name (default: from the device name)")
    parser.add_argument("--root", type=Path, default=REPO,
                        help="where benchmarks/results/<gpu>/ and data/ are (default: this repository)")  # fmt: skip
    parser.add_argument("--collect-jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--list", action="store_true", help="print the plan and which steps are done, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    deadline = time.monotonic() + args.budget
    gpu = args.gpu or gpu_folder()
    results = results_folder(args.root, gpu)
    results.mkdir(parents=True, exist_ok=True)
    steps = plan(gpu, args.collect_jobs, args.root)
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        if unknown := wanted - {s.name for s in steps}:
            parser.error(f"unknown steps {sorted(unknown)}; the plan has {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in wanted]
    if args.list:
        for step in steps:
            print(f"{step.name:24s} {'done' if is_done(step, results) else 'to do':6s} {step.why}")
        return 0
    summary: dict[str, Any] = {"gpu": gpu, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": []}
    for step in steps:
        if is_done(step, results):
            summary["steps"].append({"step": step.name, "state": "done earlier"})
            continue
        left = deadline - time.monotonic() - RESERVE_S
        if left < MIN_STEP_S:
            summary["steps"].append({"step": step.name, "state": "not started: out of time"})
            continue
        summary["steps"].append(run_step(step, args.root, results, min(left, step.cap_s)))
        pack(args.out, args.root, gpu, summary)
    archive = pack(args.out, args.root, gpu, summary)
    log.info("packed %s (%.1f MiB); unpack with: tar xzf %s -C <repository root>", archive,
             archive.stat().st_size / 2**20, ARCHIVE)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
