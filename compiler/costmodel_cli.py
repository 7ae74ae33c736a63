"""`tilefuse costmodel collect|train|eval`: argument parsers and runners, registered in compiler/cli.py's COMMANDS
table. `eval` prints JSON with --json, else rich tables (compiler/render.py's primitives)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..costmodel.records import read_records
from ..costmodel.split import training_subset
from .render import EXIT_OK, print_json

log = logging.getLogger("tilefuse.costmodel")


def add_costmodel_arguments(parser: argparse.ArgumentParser) -> None:
    from ..costmodel.collect import FAMILIES, SHAPE_GRIDS

    sub = parser.add_subparsers(dest="costmodel_command", required=True, metavar="SUBCOMMAND")
    collect = sub.add_parser("collect", help="measure Spec × config grids into a record file (GPU)")
    collect.add_argument("--family", choices=(*FAMILIES, "all"), default="attention",
                         help="kernel family to measure, or all of them (default: attention, the forward)")  # fmt: skip
    collect.add_argument("--shapes", choices=SHAPE_GRIDS, default="small", help="shape grid (tiny: interpreter)")
    collect.add_argument("--out", required=True, help="record file, e.g. data/h100-attention.jsonl.gz (appended)")
    collect.add_argument("--limit", type=int, default=None, help="measure at most N new records")
    collect.add_argument("--gpu", default=None, help="GPU table entry for constraints (default: this device's)")
    collect.add_argument("--compiler-features", action="store_true", help="also record TTGIR/cubin facts")
    collect.add_argument(
        "--jobs", type=int, default=1, help="compile the kernels first in N worker processes (spare CPU cores)"
    )
    collect.add_argument(
        "--interpret", action="store_true", help="time the Triton interpreter on CPU (tests only; marked interpreted)"
    )
    train = sub.add_parser("train", help="train the learned ranker on record files")
    train.add_argument("--data", nargs="+", required=True)
    train.add_argument("--out", required=True, help="model JSON path (costmodel/models/<gpu>.json ships it)")
    train.add_argument("--kind", choices=("gbdt", "mlp"), default="gbdt",
                       help="gbdt: LightGBM LambdaRank (default); mlp: pairwise-ranking MLP")  # fmt: skip
    train.add_argument("--trees", type=int, default=300, help="gbdt: boosting rounds")
    train.add_argument("--holdout-shapes", type=float, default=0.2, help="fraction of Specs kept out of training")
    train.add_argument("--holdout-gpu", default=None, help="GPU name kept out of training")
    train.add_argument("--epochs", type=int, default=300, help="mlp: training epochs")
    train.add_argument("--seed", type=int, default=0)
    evaluate = sub.add_parser("eval", help="ranking metrics of a model (and the analytic baseline) on record files")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", nargs="+", required=True)
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.add_argument("--plot", default=None, help="write predicted vs measured to this PNG (matplotlib)")


def run_costmodel(args: argparse.Namespace) -> int:
    runners = {"collect": run_collect, "train": run_train, "eval": run_eval}
    return runners[args.costmodel_command](args)


def _collect_in_interpreter(args: argparse.Namespace) -> int:
    """Run collect again in a child with TRITON_INTERPRET=1: Triton reads it when a kernel is decorated, and this
    process imported the kernels already."""
    argv = [sys.executable, "-m", "tilefuse.compiler.cli", "costmodel", "collect", "--interpret",
            "--family", args.family, "--out", args.out, "--shapes", args.shapes]  # fmt: skip
    argv += ["--limit", str(args.limit)] if args.limit is not None else []
    argv += ["--gpu", args.gpu] if args.gpu else []
    argv += ["--compiler-features"] if args.compiler_features else []
    argv += ["--jobs", str(args.jobs)] if args.jobs > 1 else []
    return subprocess.run(argv, env={**os.environ, "TRITON_INTERPRET": "1"}, check=False).returncode


def run_collect(args: argparse.Namespace) -> int:
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        return _collect_in_interpreter(args)
    from ..costmodel.collect import (
        FAMILIES,
        TINY_CHOICES,
        MeasureFn,
        Task,
        collect,
        interpreter_measure,
        plan_tasks,
        shape_grid,
        warm_kernels,
    )
    from ..costmodel.hardware import current_gpu, get_gpu

    measure: MeasureFn
    if args.interpret:  # tiny shapes and knob grids: the interpreter runs a launch in about a second
        gpu, measure, grid = get_gpu(args.gpu or "h100"), interpreter_measure, "tiny"
    else:
        from tilefuse.costmodel.measure import gpu_measure, require_cuda

        require_cuda()
        gpu, measure, grid = get_gpu(args.gpu) if args.gpu else current_gpu(), gpu_measure, args.shapes
    families = FAMILIES if args.family == "all" else (args.family,)
    tasks = [task for family in families
             for task in plan_tasks(shape_grid(family, grid), gpu, TINY_CHOICES[family] if args.interpret else None,
                                    kind=family)]  # fmt: skip
    device = "cpu" if args.interpret else "cuda"

    def warm(todo: Sequence[Task]) -> None:
        Console(stderr=True).print(f"compiling {len(todo)} configs in {args.jobs} processes first")
        warm_kernels(todo, args.jobs, device)

    with Progress(console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("measuring", total=None)
        summary = collect(
            tasks, args.out, measure, gpu, gpu_name="triton-interpreter" if args.interpret else gpu.name,
            interpreted=args.interpret, compiler_features=args.compiler_features, limit=args.limit,
            on_step=lambda done, total: progress.update(bar, completed=done, total=total),
            warm=warm if args.jobs > 1 else None,
        )  # fmt: skip
    Console().print(f"{summary.written} records written to {args.out} ({summary.skipped} already there): "
                    f"{summary.by_status}")  # fmt: skip
    return EXIT_OK


def run_train(args: argparse.Namespace) -> int:
    from ..costmodel.gbdt import GBDTSettings, train_gbdt
    from ..costmodel.learned import TrainSettings, train
    from ..costmodel.ranker import CostModel

    records = read_records(args.data)
    subset = training_subset(records, args.holdout_shapes, args.holdout_gpu)
    model: CostModel
    if args.kind == "gbdt":
        model = train_gbdt(subset, GBDTSettings(num_trees=args.trees, seed=args.seed))
    else:
        model = train(subset, TrainSettings(epochs=args.epochs, seed=args.seed))
    model.trained_on["data"] = [Path(p).name for p in args.data]
    model.save(args.out)
    Console().print(f"trained on {len(subset)} of {len(records)} records "
                    f"({model.trained_on['groups']} groups); model written to {args.out}")  # fmt: skip
    return EXIT_OK


def run_eval(args: argparse.Namespace) -> int:
    from ..costmodel.evaluate import METRICS, evaluation_report, scatter_plot
    from ..costmodel.ranker import load_model

    model = load_model(args.model)
    records = read_records(args.data)
    report = evaluation_report(records, model)
    if args.plot and not scatter_plot(records, model, args.plot):
        log.warning("matplotlib is not installed: no plot written")
    if args.json:
        print_json(report)
        return EXIT_OK
    console = Console()
    for split, result in report.items():
        table = Table(title=f"{split} ({result['learned']['groups']} groups)")
        table.add_column("model")
        table.add_column("family")
        table.add_column("groups", justify="right")
        for name in METRICS:
            table.add_column(name, justify="right")
        rows = [("all", result), *sorted(result["families"].items())]
        for family, models in rows:
            for name in ("learned", "analytic"):
                metrics = models[name]
                cells = ("-" if metrics[m] is None else f"{metrics[m]:.3f}" for m in METRICS)
                table.add_row(name, family, str(metrics["groups"]), *cells)
        console.print(table)
    return EXIT_OK
