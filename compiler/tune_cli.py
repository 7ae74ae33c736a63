"""`tilefuse tune`: compile a model to find its fused sites, then choose (or measure) each site's tile configs and
store them in the tuning database; `--replay` compares search strategies on measurement records.

It lives with the compiler because it captures and compiles the model; the tuning itself is autotune's.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from tilefuse.autotune.search import MODES, TuneOutcome, TuneSettings
from tilefuse.codegen.families import KERNEL_FAMILIES, site_families
from tilefuse.costmodel.hardware import GPUSpec, get_gpu, gpu_names

from .render import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail, format_config, format_us


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments, positive_int

    add_model_arguments(parser)
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="bfloat16",
        help="dtype the model is captured and tuned in",
    )
    parser.add_argument("--budget", type=positive_int, default=16, help="measured configs per site (measure mode)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="model (cost model only; default without a GPU), measure (GPU search; default with "
                             "one) or exhaustive (measure every feasible config)")  # fmt: skip
    parser.add_argument("--db", default=None, help="tuning database: file path, sqlite:///... or postgresql://... "
                        "(default: $TILEFUSE_TUNING_DB or ~/.cache/tilefuse/tuning.sqlite)")  # fmt: skip
    parser.add_argument("--workers", type=positive_int, default=1, help="worker processes on one study (one per GPU)")
    parser.add_argument("--compile-jobs", type=int, default=None, metavar="N",
                        help="measure mode: compile the likely configs in N processes first "
                             "(default: CPU cores - 1, at most 8; 0 or 1: compile as measured)")  # fmt: skip
    parser.add_argument("--gpu", default=None, help=f"GPU to tune for when it is not this machine's ({gpu_names()})")
    parser.add_argument("--out", default=None, metavar="DIR", help="write report.json (+ plots) to DIR")
    parser.add_argument("--force", action="store_true", help="tune again even when the database has the key")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument("--family", action="append", choices=KERNEL_FAMILIES, default=None, metavar="KERNEL",
                        help="tune only this kernel family (repeatable; default: every kernel of every site: "
                             f"{', '.join(KERNEL_FAMILIES)})")  # fmt: skip
    # Replay evaluation: `tilefuse tune --replay DATA` simulates the search strategies on measured records (no GPU).
    for action in parser._actions:
        if action.dest == "model":  # MODEL is optional with --replay
            action.nargs, action.default, action.required = "?", None, False
    parser.add_argument("--replay", action="append", default=None, metavar="DATA",
                        help="replay search strategies on measurement records (a *.jsonl.gz file or a directory; "
                             "repeatable) instead of tuning MODEL; --budget sets the 'within budget' line")  # fmt: skip
    parser.add_argument("--seeds", type=positive_int, default=10, help="replay: seeds per strategy and group")


def _target(args: argparse.Namespace) -> GPUSpec:
    from tilefuse.autotune.registry import target_gpu

    if args.gpu:
        return get_gpu(args.gpu)
    return target_gpu() or get_gpu("h100")


def site_specs(report: Any) -> list[tuple[str, Any]]:
    """(node, Spec) of every fused site that launches its own kernel, each Spec once."""
    seen: dict[Any, str] = {}
    for site in report.sites:
        if site.status != "fused" or site.spec is None or site.detail.get("fused_into"):
            continue
        seen.setdefault(site.spec, site.node)
    return [(node, spec) for spec, node in seen.items()]


def in_dtype(model: Any, inputs: tuple[Any, ...], dtype: str) -> tuple[Any, tuple[Any, ...]]:
    """The model and its floating-point inputs cast to `dtype`, so the captured Specs are what that dtype's
    compile sees (upcasts inside the model, e.g. fp32 norm statistics, stay as written)."""
    import torch

    target = getattr(torch, dtype)
    cast = tuple(t.to(target) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
    return model.to(target), cast


def site_jobs(sites: list[tuple[str, Any]], families: list[str] | None = None) -> list[tuple[str, Any, str]]:
    """(node, Spec, kernel family) for every kernel each site launches (its forward, then its backward), restricted
    to `families` when given."""
    jobs = []
    for node, spec in sites:
        for kind in site_families(spec):
            if families is None or kind in families:
                jobs.append((node, spec, kind))
    return jobs


def run_tune(args: argparse.Namespace) -> int:
    from tilefuse.autotune.db import TuningDB, TuningDBError
    from tilefuse.autotune.report import tune_report, write_report

    from .cli import import_explain
    from .presets import load_model

    if getattr(args, "replay", None):
        return run_replay(args)
    if args.model is None:
        return fail("tune needs a MODEL (or --replay DATA)", EXIT_USAGE)
    try:
        model, inputs = load_model(args.model, batch=args.batch, seq=args.seq)
        gpu = _target(args)
        mode = args.mode or ("measure" if _has_cuda() else "model")
        jobs = args.compile_jobs if args.compile_jobs is not None else min(8, (os.cpu_count() or 1) - 1)
        settings = TuneSettings(mode=mode, budget=args.budget, workers=args.workers, force=args.force, seed=args.seed,
                                compile_jobs=jobs)  # fmt: skip
        db = TuningDB(args.db)
    except (ValueError, TypeError, TuningDBError) as err:
        return fail(str(err), EXIT_USAGE)
    jobs = site_jobs(site_specs(import_explain()(*in_dtype(model, inputs, args.dtype))), args.family)
    outcomes = _tune_sites(jobs, gpu, settings, db)
    report = tune_report(args, gpu, settings, jobs, outcomes)
    if args.out:
        report["notes"] += write_report(report, outcomes, Path(args.out))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _render_tune(Console(), report)
    return EXIT_OK if all(row.get("error") is None for row in report["sites"]) else EXIT_FAILED


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _tune_sites(jobs: list[tuple[str, Any, str]], gpu: GPUSpec, settings: TuneSettings, db: Any) -> list[Any]:
    from tilefuse.autotune.search import tune_spec

    outcomes: list[TuneOutcome | Exception] = []
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("tuning", total=len(jobs))
        for node, spec, kind in jobs:
            progress.update(task, description=f"tuning {node} ({kind})")
            try:
                outcomes.append(tune_spec(spec, gpu, settings, kind=kind, db=db))
            except (ValueError, RuntimeError) as err:  # dynamic dims, no GPU for measure mode
                outcomes.append(err)
            progress.advance(task)
    return outcomes


def _render_tune(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=f"tilefuse tune {report['model']} on {report['gpu']} ({report['mode']}, {report['dtype']})")
    columns = ("site", "kind", "kernel", "best config", "predicted µs", "measured µs", "default", "speed-up", "from")
    for column in columns:
        table.add_column(column)
    for row in report["sites"]:
        kernel = row["kernel"]
        if row.get("error"):
            table.add_row(row["node"], row["kind"], kernel, f"[red]{escape(row['error'])}[/]", "", "", "", "", "")
            continue
        measured = row["best_latency_us"] if row["source"] != "model" else None
        speedup = f"{row['speedup_over_default']:.2f}x" if row["speedup_over_default"] else "-"
        best, default = format_config(row["best"], kernel), format_config(row["default"], kernel)
        predicted = row["best_predicted_us"] if not row["hit"] else row["best_latency_us"]
        origin = "db hit" if row["hit"] else row["source"]
        table.add_row(row["node"], row["kind"], kernel, best, format_us(predicted), format_us(measured), default,
                      speedup, origin)  # fmt: skip
    console.print(table)
    for note in report["notes"]:
        console.print(f"[dim]{escape(note)}[/]")


def run_replay(args: argparse.Namespace) -> int:
    from tilefuse.autotune.replay import replay_files

    try:
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("replay", total=None)
            report = replay_files(args.replay, gpu=args.gpu, seeds=args.seeds, budget=args.budget,
                                  progress=lambda text: progress.update(task, description=escape(text)))  # fmt: skip
    except ValueError as err:
        return fail(str(err), EXIT_USAGE)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _render_replay(Console(), report)
    return EXIT_OK


def _render_replay(console: Console, report: dict[str, Any]) -> None:
    margin = f"{report['margin']:.0%}"
    table = Table(title=f"replay: measured configs to come within {margin} of the exhaustive best "
                        f"({len(report['groups'])} groups x {report['seeds']} seeds)")  # fmt: skip
    for column in ("strategy", "median", "mean", "reached", f"groups ≤ {report['budget']}"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for row in report["strategies"]:
        median = f"{row['median']:g}" if row["median"] is not None else "never"
        mean = f"{row['mean']:.1f}" if row["mean"] is not None else "-"
        table.add_row(row["strategy"], median, mean, f"{row['reached']:.0%}", f"{row['groups_within_budget']:.0%}")
    console.print(table)
    for note in report["notes"]:
        console.print(f"[dim]{escape(note)}[/]")
