"""The `tilefuse` command line: `tilefuse explain MODEL` and `tilefuse demo`.

The only module that writes to the terminal: library code logs, this module renders reports as rich tables or
JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from .presets import PRESET_NAMES, load_model

log = logging.getLogger(__name__)

DEMO_ATOL = 1e-4
FUSED_KINDS = ("attention", "rmsnorm", "layernorm", "rope")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Spec fields worth a glance in the table, per site kind; the JSON output has them all.
_SPEC_FIELDS: dict[str, tuple[str, ...]] = {
    "attention": (
        "q_len",
        "kv_len",
        "head_dim",
        "gqa_group",
        "causal",
        "align",
        "window",
        "softcap",
        "alibi",
        "sinks",
        "mask",
        "dropout_p",
        "rope",
        "source",
    ),
    "rmsnorm": ("width", "eps", "weight_offset", "residual"),
    "layernorm": ("width", "eps", "has_weight", "has_bias", "residual"),
    "rope": ("layout", "rotary_dim", "head_dim"),
}
# Values that say nothing special, left out of the table.
_UNREMARKABLE: dict[str, Any] = {
    "gqa_group": 1,
    "align": "top_left",
    "mask": "none",
    "dropout_p": 0.0,
    "weight_offset": 0.0,
    "source": "matmul",
    "has_weight": True,
}


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, how it adds its arguments and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------------------------ rendering


def _format_value(value: Any) -> str:
    if isinstance(value, Mapping) and value.get("kind") == "rope":
        return f"{value.get('layout')}/{value.get('rotary_dim')}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def spec_summary(kind: str, spec: Mapping[str, Any] | None) -> str:
    """A short `key=value` line of the spec fields that say what is special about a site."""
    if not spec:
        return ""
    keys = [key for key in _SPEC_FIELDS.get(kind, tuple(spec)) if key in spec]
    shown = [
        f"{key}={_format_value(spec[key])}"
        for key in keys
        if spec[key] not in (None, False) and spec[key] != _UNREMARKABLE.get(key)
    ]
    return " ".join(shown)


def _site_dicts(report: Any) -> list[dict[str, Any]]:
    return [
        {
            "kind": site.kind,
            "status": site.status,
            "node": str(site.node),
            "reason": site.reason,
            "spec": site.spec.to_dict() if site.spec is not None else None,
        }
        for site in report.sites
    ]


def sites_table(report: Any, title: str) -> Table:
    """The fusion report as a table: one row per candidate site."""
    table = Table(title=title)
    for column in ("#", "kind", "status", "node", "reason / spec"):
        table.add_column(column, overflow="fold")
    for index, site in enumerate(_site_dicts(report)):
        fused = site["status"] == "fused"
        status = f"[green]{site['status']}[/]" if fused else f"[yellow]{site['status']}[/]"
        details = spec_summary(site["kind"], site["spec"]) if fused else str(site["reason"])
        table.add_row(str(index), site["kind"], status, escape(site["node"]), escape(details))
    return table


def summary_line(summary: Mapping[str, Any]) -> str:
    """'attention: 2 fused, 0 declined · rmsnorm: ...' from `FusionReport.summary()`."""
    parts = []
    for kind, counts in summary.items():
        if isinstance(counts, Mapping):
            parts.append(f"{kind}: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
        else:
            parts.append(f"{kind}: {counts}")
    return " · ".join(parts) if parts else "no candidate sites"


def render_report(console: Console, report: Any, title: str) -> None:
    console.print(sites_table(report, title))
    console.print(summary_line(report.summary()))
    for why in getattr(report, "fallbacks", []):
        console.print(f"[yellow]fell back to the unfused graph:[/] {escape(why)}")


# ------------------------------------------------------------------------------------------------ explain


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help=f"a preset ({', '.join(PRESET_NAMES)}; hf: presets take @eager or @sdpa) "
        "or package.module:factory returning (model, example_inputs)",
    )
    parser.add_argument("--batch", type=positive_int, default=2, help="batch size of the example inputs")
    parser.add_argument("--seq", type=positive_int, default=16, help="sequence length of the example inputs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def import_explain() -> Callable[..., Any]:
    # The public entry point, wherever inside the package it is implemented.
    from .. import explain

    return explain


def run_explain(args: argparse.Namespace) -> int:
    try:
        model, inputs = load_model(args.model, batch=args.batch, seq=args.seq)
    except (ValueError, TypeError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    report = import_explain()(model, inputs)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_report(Console(), report, title=f"tilefuse explain {args.model}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ demo


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")


def demo_problems(max_abs_error: float, report: Any) -> list[str]:
    """Why the demo failed, or [] when the compiled model matched eager and every site was fused."""
    problems = []
    if not math.isfinite(max_abs_error) or max_abs_error > DEMO_ATOL:
        problems.append(f"compiled output differs from eager: max abs error {max_abs_error:.3g} > atol")
    fallbacks = getattr(report, "fallbacks", [])
    problems += [f"the backend fell back to the unfused graph: {why}" for why in fallbacks]
    sites = _site_dicts(report)
    problems += [
        f"no {kind} site was found"
        for kind in ("attention", "rmsnorm")
        if not any(site["kind"] == kind for site in sites)
    ]
    for site in sites:
        if site["kind"] in FUSED_KINDS and site["status"] != "fused":
            problems.append(f"{site['kind']} site {site['node']} declined: {site['reason']}")
        elif site["kind"] == "attention" and not (site["spec"] or {}).get("rope"):
            problems.append(f"attention site {site['node']} was fused without its RoPE")
    return problems


def _run_demo_model() -> tuple[float, Any]:
    """Eager vs `torch.compile(backend="tilefuse")` on the demo model: (max abs error, fusion report)."""
    import torch

    from .demo_model import build_demo_model, demo_inputs

    model, inputs = build_demo_model(), demo_inputs()
    torch._dynamo.reset()  # a fresh compile each run, whatever ran before in this process
    compiled = torch.compile(model, backend="tilefuse", options={"inner": "eager", "strict": True})
    with torch.no_grad():
        expected = model(*inputs)
        actual = compiled(*inputs)
    error = (actual.float() - expected.float()).abs().max().item()
    return error, import_explain()(model, inputs)


def run_demo(args: argparse.Namespace) -> int:
    error, report = _run_demo_model()
    problems = demo_problems(error, report)
    if args.json:
        result = {
            "ok": not problems,
            "max_abs_error": error,
            "atol": DEMO_ATOL,
            "problems": problems,
            "report": report.to_dict(),
        }
        print(json.dumps(result, indent=2))
    else:
        console = Console()
        render_report(console, report, title="tilefuse demo: tiny Llama-style decoder (fp32)")
        verdict = "[green]OK[/]" if not problems else "[red]FAILED[/]: " + escape("; ".join(problems))
        console.print(f"compiled vs eager max abs error {error:.3g} (atol {DEMO_ATOL:g}) — {verdict}")
    return EXIT_OK if not problems else EXIT_FAILED


# ---------------------------------------------------------------------------------------------- io-report


def run_io_report(args: argparse.Namespace) -> int:
    from ..codegen.io_report import io_report

    try:
        model, inputs = load_model(args.model, batch=args.batch, seq=args.seq)
    except (ValueError, TypeError, ImportError) as err:
        return _fail(str(err), EXIT_USAGE)
    rows = io_report(import_explain()(model, inputs).sites)
    if args.json:
        print(json.dumps({"model": args.model, "sites": [r.to_dict() for r in rows]}, indent=2))
        return EXIT_OK
    table = Table(title=f"HBM bytes per fused site: {args.model} (batch {args.batch}, seq {args.seq})")
    for column in ("site", "kind", "fused", "unfused (est.)", "unfused / fused", "fused / lower bound"):
        table.add_column(column, justify="right")
    for r in rows:
        saving = f"{r.unfused_bytes / r.fused_bytes:.1f}x" if r.unfused_bytes else "-"
        bound = f"{r.fused_bytes / r.lower_bound_bytes:.2f}" if r.lower_bound_bytes else "-"
        table.add_row(r.node, r.kind, f"{r.fused_bytes:,}", f"{r.unfused_bytes or 0:,}", saving, bound)
    Console().print(table)
    return EXIT_OK


# ----------------------------------------------------------------------------------------- compile-check


def _add_compile_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="sm_90", help="GPU architecture to compile for (sm_80, sm_86, sm_89, sm_90)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--dump", metavar="DIR", help="also write the emitted Triton source of every kernel to DIR")


def run_compile_check(args: argparse.Namespace) -> int:
    from ..codegen import emit
    from ..codegen.compile_check import compile_check

    if args.dump:
        emit.set_dump_dir(args.dump)
    try:
        results = compile_check(args.arch)
    except (ValueError, RuntimeError) as err:
        return _fail(str(err), EXIT_USAGE)
    failed = [r for r in results if not r.ok or (r.spill_bytes or 0) > 0]
    if args.json:
        print(json.dumps({"arch": args.arch, "ok": not failed, "kernels": [r.to_dict() for r in results]}, indent=2))
    else:
        table = Table(title=f"tilefuse kernels compiled for {args.arch} (no GPU needed)")
        for column in ("kernel", "ok", "registers", "spill bytes", "shared bytes", "SASS per loop", "error"):
            table.add_column(column)
        for r in results:
            loops = "/".join(map(str, r.loop_instructions))
            table.add_row(r.name, "yes" if r.ok else "[red]no[/]", str(r.registers), str(r.spill_bytes),
                          str(r.shared_bytes), loops, escape(r.error or ""))  # fmt: skip
        Console().print(table)
    return EXIT_OK if not failed else EXIT_FAILED


# ------------------------------------------------------------------------------------------------ main


def _add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from .tune_cli import add_tune_arguments

    add_tune_arguments(parser)


def _run_tune(args: argparse.Namespace) -> int:
    from .tune_cli import run_tune

    return run_tune(args)


def _add_db_arguments(parser: argparse.ArgumentParser) -> None:
    from ..autotune.cli import add_db_arguments

    add_db_arguments(parser)


def _run_db(args: argparse.Namespace) -> int:
    from ..autotune.cli import run_db

    return run_db(args)


def _add_costmodel_arguments(parser: argparse.ArgumentParser) -> None:
    from ..costmodel.cli import add_costmodel_arguments

    add_costmodel_arguments(parser)


def _run_costmodel(args: argparse.Namespace) -> int:
    from ..costmodel.cli import run_costmodel

    return run_costmodel(args)


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from ..benchmarks.run import add_arguments

    add_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from ..benchmarks.run import run

    return run(args)


COMMANDS: tuple[Command, ...] = (
    Command(
        "explain",
        "show which attention, norm and RoPE sites of a model tilefuse fuses, and why not",
        add_model_arguments,
        run_explain,
    ),
    Command(
        "demo",
        "compile the built-in tiny Llama-style model, compare with eager, show the fusion report",
        _add_demo_arguments,
        run_demo,
    ),
    Command(
        "io-report",
        "HBM bytes of every fused site: fused kernel vs unfused graph vs the attention I/O lower bound",
        add_model_arguments,
        run_io_report,
    ),
    Command(
        "compile-check",
        "compile every kernel family for a GPU target on this machine and report registers, spills and shared memory",
        _add_compile_check_arguments,
        run_compile_check,
    ),
    Command(
        "tune",
        "tune the tile configs of every fused site of a model (cost model, or Optuna search on the GPU)",
        _add_tune_arguments,
        _run_tune,
    ),
    Command(
        "db",
        "list, show, export, import or clear the tuning database",
        _add_db_arguments,
        _run_db,
    ),
    Command(
        "costmodel",
        "collect measurement records (GPU), train the learned cost model, evaluate it beside the analytic one",
        _add_costmodel_arguments,
        _run_costmodel,
    ),
    Command(
        "bench",
        "run benchmark suites: tilefuse beside SDPA, FlexAttention, Inductor, Liger, eager (= benchmarks/run.py)",
        _add_bench_arguments,
        _run_bench,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilefuse", description="Fused, tiled attention, norms and RoPE for torch.compile."
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="level of the tilefuse logger (default: WARNING)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _configure_logging(level: str | None) -> None:
    handler = RichHandler(console=Console(stderr=True), show_path=False)
    # basicConfig leaves an already configured root logger (an embedding app, pytest) alone.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])
    if level is not None:
        logging.getLogger("tilefuse").setLevel(level)


def _fail(message: str, code: int) -> int:
    Console(stderr=True).print(f"[red]error:[/] {escape(message)}", highlight=False)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tilefuse` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    try:
        code: int = args.run(args)
    except ImportError as exc:
        return _fail(f"{exc} (is this tilefuse installed with all its parts?)", EXIT_FAILED)
    except Exception as exc:
        log.debug("command %s failed", args.command, exc_info=True)
        return _fail(f"{args.command} failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
    return code


if __name__ == "__main__":
    sys.exit(main())
