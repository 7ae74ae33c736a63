"""The `tilefuse` command line: the subcommands, their arguments and what each runs.

Library code logs; the commands write to the terminal only through render.py (tables, JSON, the error line). A
subcommand of a package above the compiler (`tilefuse bench`) comes in through an entry point (commands.py).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from .commands import ENTRY_POINT_GROUP, Command, installed_commands
from .presets import PRESET_NAMES, load_model
from .render import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    compile_check_table,
    fail,
    io_table,
    print_json,
    render_report,
)

log = logging.getLogger(__name__)

DEMO_ATOL = 1e-4
FUSED_KINDS = ("attention", "rmsnorm", "layernorm", "rope")


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
    """`tilefuse.explain`, imported when a command needs it (it pulls in torch.compile's machinery)."""
    from .api import explain

    return explain


def run_explain(args: argparse.Namespace) -> int:
    try:
        model, inputs = load_model(args.model, batch=args.batch, seq=args.seq)
    except (ValueError, TypeError) as exc:
        return fail(str(exc), EXIT_USAGE)
    report = import_explain()(model, inputs)
    if args.json:
        print_json(report.to_dict())
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
    sites = [site.to_dict() for site in report.sites]
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
        print_json(result)
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
        return fail(str(err), EXIT_USAGE)
    rows = io_report(import_explain()(model, inputs).sites)
    if args.json:
        print_json({"model": args.model, "sites": [r.to_dict() for r in rows]})
    else:
        Console().print(io_table(rows, f"HBM bytes per fused site: {args.model} (batch {args.batch}, seq {args.seq})"))
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
        return fail(str(err), EXIT_USAGE)
    failed = [r for r in results if not r.ok or (r.spill_bytes or 0) > 0]
    if args.json:
        print_json({"arch": args.arch, "ok": not failed, "kernels": [r.to_dict() for r in results]})
    else:
        Console().print(compile_check_table(results, args.arch))
    return EXIT_OK if not failed else EXIT_FAILED


# ------------------------------------------------------------------------------------------------ main


def _add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from .tune_cli import add_tune_arguments

    add_tune_arguments(parser)


def _run_tune(args: argparse.Namespace) -> int:
    from .tune_cli import run_tune

    return run_tune(args)


def _add_db_arguments(parser: argparse.ArgumentParser) -> None:
    from .db_cli import add_db_arguments

    add_db_arguments(parser)


def _run_db(args: argparse.Namespace) -> int:
    from .db_cli import run_db

    return run_db(args)


def _add_costmodel_arguments(parser: argparse.ArgumentParser) -> None:
    from .costmodel_cli import add_costmodel_arguments

    add_costmodel_arguments(parser)


def _run_costmodel(args: argparse.Namespace) -> int:
    from .costmodel_cli import run_costmodel

    return run_costmodel(args)


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
)
# `tilefuse bench` and any other command a package above the compiler adds: found installed (commands.py).


def build_parser(added: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand: COMMANDS, then `added` (default: the installed entry points' commands)."""
    added = installed_commands() if added is None else added
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
    for command in (*COMMANDS, *added):
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


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    added = installed_commands()
    try:
        return build_parser(added).parse_args(argv)
    except SystemExit as exit_:
        if exit_.code == EXIT_USAGE and not added:  # e.g. `tilefuse bench` in an install older than its entry point
            fail(f"no {ENTRY_POINT_GROUP} entry points are installed, so `tilefuse bench` is missing: reinstall "
                 "tilefuse (e.g. `pip install -e .` in its checkout)", EXIT_USAGE)  # fmt: skip
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tilefuse` console script; returns the exit code."""
    args = _parse(argv)
    _configure_logging(args.log_level)
    try:
        code: int = args.run(args)
    except ImportError as exc:
        return fail(f"{exc} (is this tilefuse installed with all its parts?)", EXIT_FAILED)
    except Exception as exc:
        log.debug("command %s failed", args.command, exc_info=True)
        return fail(f"{args.command} failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
    return code


if __name__ == "__main__":
    sys.exit(main())
