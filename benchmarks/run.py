"""Run tilefuse benchmark suites and write JSON + markdown (+ PNG plots when matplotlib is installed).

    python benchmarks/run.py SUITE [SUITE ...] [--tiny] [--out DIR] [--json] [--filter REGEX] [--contenders a,b]

SUITE: attention, decode, norms, e2e, io, compile, tuning, or all. Results go to benchmarks/results/<gpu>/ (or
results/cpu/) as <suite>[-<tag>][-tiny].{json,md,png}. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tilefuse.benchmarks import report
from tilefuse.benchmarks.environment import environment, gpu_slug
from tilefuse.benchmarks.harness import SCHEMA_VERSION, Context, Record, configure_dynamo
from tilefuse.compiler.commands import Command
from tilefuse.compiler.render import EXIT_OK, EXIT_USAGE, print_json

log = logging.getLogger("tilefuse.benchmarks")
SUITES = ("attention", "decode", "norms", "e2e", "io", "compile", "tuning")
CPU_RUNNABLE = ("io", "compile", "tuning")  # full size is fine on a CPU; the others need --tiny there
RESULTS = Path(__file__).resolve().parent / "results"


def run_suite(name: str, ctx: Context, full_grid: bool = False, prior: dict[str, Any] | None = None,
              checkpoint: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run one suite and return its result document (records, environment, config, notes).

    `prior`: the document an interrupted run of the same suite left (``"partial": true``); its cases are kept and
    not measured again. `checkpoint`: called with the partial document after every case.
    """
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    module = importlib.import_module(f"tilefuse.benchmarks.suite_{name}")
    configure_dynamo()
    ctx.notes.clear()
    ctx.completed.clear()
    kept = [Record(**r) for r in prior["records"]] if prior else []
    ctx.done_cases = frozenset(r.case for r in kept)
    if prior:
        ctx.note(f"resumed: {len(ctx.done_cases)} cases measured by an earlier run ({prior['env'].get('date')}, "
                 f"host {prior['env'].get('host')}); ratios are still taken within each case")  # fmt: skip
        ctx.notes.extend(n for n in prior.get("notes", []) if n not in ctx.notes)
    start = time.perf_counter()

    def merged(records: list[Record]) -> list[Record]:  # a case measured again (norms' copy) replaces the old one
        again = {(r.case, r.contender) for r in records}
        return [*(r for r in kept if (r.case, r.contender) not in again), *records]

    def document(records: list[Record], partial: bool) -> dict[str, Any]:
        config = {
            "tiny": ctx.tiny, "device": str(ctx.device), "repeats": ctx.repeats, "warmup_ms": ctx.warmup_ms,
            "rep_ms": ctx.rep_ms, "cuda_graphs": ctx.cuda_graphs, "inner": ctx.inner, "filter": ctx.case_filter,
            "contenders": sorted(ctx.contenders) if ctx.contenders else None, "full_grid": full_grid,
        }  # fmt: skip
        return {
            "schema": SCHEMA_VERSION,
            "suite": name,
            "metric": module.METRIC,
            "x_axis": module.X_AXIS,
            "config": config,
            "env": environment(ctx.device),
            "elapsed_s": time.perf_counter() - start + (prior["elapsed_s"] if prior else 0.0),
            "partial": partial,
            "notes": list(ctx.notes),
            "records": [r.to_dict() for r in merged(records)],
        }

    if checkpoint is not None:
        ctx.checkpoint = lambda records: checkpoint(document(records, partial=True))
    try:
        records = module.run(ctx, full_grid) if name == "attention" else module.run(ctx)
    finally:
        ctx.checkpoint, ctx.done_cases = None, frozenset()
    finish = getattr(module, "finish", None)
    if finish is not None and kept:  # suite-wide derived metrics over the kept and the new records
        finish(merged(records))
    return document(records, partial=False)


def result_stem(suite: str, tag: str | None, tiny: bool) -> str:
    return suite + (f"-{tag}" if tag else "") + ("-tiny" if tiny else "")


def write_result(result: dict[str, Any], out: Path, tag: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result["suite"], tag, result["config"]["tiny"])
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    report.write_json(result, paths[0])
    if result.get("partial"):
        return paths[:1]  # tables and plots are written once the suite finishes
    report.write_markdown(result, paths[1])
    if report.write_plot(result, out / f"{stem}.png"):
        paths.append(out / f"{stem}.png")
    return paths


def interrupted_result(path: Path) -> dict[str, Any] | None:
    """The document at `path` when an earlier run was interrupted there (``"partial": true``), else None."""
    if not path.exists():
        return None
    try:
        result: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("cannot resume from %s (%s): measuring every case again", path, err)
        return None
    return result if result.get("partial") else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark options, shared by this script and `tilefuse bench`."""
    parser.add_argument("suites", nargs="+", choices=(*SUITES, "all"), metavar="SUITE", help=", ".join(SUITES))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run of the whole harness)")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<gpu or cpu>/)")
    parser.add_argument("--json", action="store_true", help="also print the result JSON to stdout")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--filter", help="regular expression: run only the cases whose name matches")
    parser.add_argument("--contenders", help="comma-separated contenders to run (default: all)")
    parser.add_argument("--tag", help="added to the output file names, e.g. to keep parts of one grid apart")
    parser.add_argument("--repeats", type=int, default=20, help="CPU: interleaved timing rounds")
    parser.add_argument("--warmup-ms", type=int, default=25, help="CUDA: do_bench warm-up budget")
    parser.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench measurement budget")
    parser.add_argument("--cuda-graphs", action="store_true", help="CUDA: time with do_bench_cudagraph")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                        help="inner compiler of the tilefuse contenders (e2e, compile, tuning)")  # fmt: skip
    parser.add_argument("--full-grid", action="store_true", help="attention: every dtype x head dim x N")
    parser.add_argument("--profile", metavar="CONTENDER",
                        help="no timing, no output: call CONTENDER's selected cases between cudaProfilerStart/Stop "
                        "for ncu --profile-from-start off (benchmarks/profile.py drives this)")  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true", help="keep the cases an interrupted run left in the output; measure the rest"
    )


def context(args: argparse.Namespace) -> Context:
    contenders = frozenset(c.strip() for c in args.contenders.split(",")) if args.contenders else None
    return Context(
        device=torch.device(args.device), tiny=args.tiny, repeats=args.repeats, warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms, cuda_graphs=args.cuda_graphs, contenders=contenders, case_filter=args.filter,
        inner=args.inner, profile=args.profile,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the suites `args` names (parsed by `add_arguments`); 0 on success, 2 (usage) when they need a GPU."""
    log.setLevel(logging.INFO)
    ctx = context(args)
    suites = SUITES if "all" in args.suites else tuple(dict.fromkeys(args.suites))
    needs_tiny = [s for s in suites if s not in CPU_RUNNABLE]
    if not ctx.is_cuda and not ctx.tiny and needs_tiny:
        log.error("suites %s need a GPU at full size; pass --tiny on CPU", ", ".join(needs_tiny))
        return EXIT_USAGE
    out = args.out or RESULTS / gpu_slug(ctx.device)
    if args.profile:
        for name in suites:
            run_suite(name, ctx, args.full_grid)
        return EXIT_OK
    for name in suites:
        prior = interrupted_result(out / f"{result_stem(name, args.tag, ctx.tiny)}.json") if args.resume else None
        result = run_suite(name, ctx, args.full_grid, prior, checkpoint=lambda doc: write_result(doc, out, args.tag))
        paths = write_result(result, out, args.tag)
        statuses = [r["status"] for r in result["records"]]
        summary = ", ".join(f"{s} {statuses.count(s)}" for s in dict.fromkeys(statuses))
        log.info("%s: %d records (%s) in %.0f s -> %s", name, len(statuses), summary, result["elapsed_s"],
                 ", ".join(str(p) for p in paths))  # fmt: skip
        if args.json:
            print_json(result, indent=1, default=str)
    return EXIT_OK


# `tilefuse bench`: the compiler's CLI finds it through the `tilefuse.commands` entry point (pyproject.toml), since
# the compiler may not import the benchmarks.
COMMAND = Command(
    "bench",
    "run benchmark suites: tilefuse beside SDPA, FlexAttention, Inductor, Liger, eager (= benchmarks/run.py)",
    add_arguments,
    run,
)

if __name__ == "__main__":
    sys.exit(main())
