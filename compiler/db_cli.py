"""`tilefuse db list|show|export|import|clear`: argument parser and runner, registered in compiler/cli.py's COMMANDS
table. Records are JSON first (autotune/db.py), then rendered as rich tables (compiler/render.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..codegen.families import KERNEL_FAMILIES
from ..codegen.tile_config import config_to_dict
from .render import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail, format_config, format_us, print_json


# -------------------------------------------------------------------------------------------------------- db
def add_db_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "show", "export", "import", "clear"))
    parser.add_argument(
        "target", nargs="?", default=None, help="show: a key digest prefix; export/import: a JSON file ('-': stdio)"
    )
    parser.add_argument("--db", default=None, help="tuning database path or URL (default: the cache file)")
    parser.add_argument("--family", default=None, metavar="KERNEL",
                        help=f"only this kernel family ({', '.join(KERNEL_FAMILIES)})")  # fmt: skip
    parser.add_argument("--recover", action="store_true", help="clear: move a corrupt/foreign database aside first")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_db(args: argparse.Namespace) -> int:
    from ..autotune.db import TuningDB, TuningDBError

    try:
        db = TuningDB(args.db, recover=args.recover and args.action == "clear")
        if args.action in ("show", "export", "import") and args.target is None:
            raise ValueError(f"db {args.action} needs a target (see tilefuse db --help)")
        return _DB_ACTIONS[args.action](db, args)
    except (ValueError, KeyError, OSError, TuningDBError) as err:
        return fail(str(err).strip("'\""), EXIT_USAGE if not isinstance(err, TuningDBError) else EXIT_FAILED)


def _db_list(db: Any, args: argparse.Namespace) -> int:
    records = db.records(args.family)
    if args.json:
        print_json([{**r.to_dict(), "trials": len(r.trials)} for r in records])
        return EXIT_OK
    table = Table(title=f"tuning database {db.url} ({len(records)} entries)")
    for column in ("key", "kernel", "site", "best config", "latency µs", "source", "versions"):
        table.add_column(column)
    for r in records:
        best = config_to_dict(r.best) if r.best else None
        versions = " ".join(f"{k} {v}" for k, v in json.loads(r.key.versions).items())
        table.add_row(r.key.digest[:12], r.key.family, r.key.describe(), format_config(best, r.key.family),
                      format_us(r.best_latency_us), r.source, versions)  # fmt: skip
    Console().print(table)
    return EXIT_OK


def _db_show(db: Any, args: argparse.Namespace) -> int:
    record = db.find(args.target)
    if args.json:
        print_json(record.to_dict())
        return EXIT_OK
    console = Console()
    kernel = record.key.family
    best = format_config(config_to_dict(record.best) if record.best else None, kernel)
    console.print(f"[bold]{escape(record.key.describe())}[/] ({record.key.digest})  kernel {kernel}  best {best} "
                  f"{format_us(record.best_latency_us)} µs from {record.source}")  # fmt: skip
    table = Table(title="trials")
    for column in ("config", "status", "p50 µs", "p20–p80 µs", "predicted µs", "error"):
        table.add_column(column)
    for t in record.trials:
        spread = f"{t.latency_us['p20']:.1f}–{t.latency_us['p80']:.1f}" if "p20" in t.latency_us else "-"
        table.add_row(format_config(config_to_dict(t.config), kernel), t.status, format_us(t.latency_us.get("p50")),
                      spread, format_us(t.predicted_us), escape(t.error or ""))  # fmt: skip
    console.print(table)
    return EXIT_OK


def _db_export(db: Any, args: argparse.Namespace) -> int:
    text = json.dumps(db.export_json(args.family), indent=2)
    if args.target == "-":
        print(text)
    else:
        Path(args.target).write_text(text + "\n")
        Console(stderr=True).print(f"exported to {escape(args.target)}")
    return EXIT_OK


def _db_import(db: Any, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.target == "-" else Path(args.target).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{args.target}: not JSON ({err})") from err
    count = db.import_json(data)
    Console(stderr=True).print(f"imported {count} entries into {escape(db.url)}")
    return EXIT_OK


def _db_clear(db: Any, args: argparse.Namespace) -> int:
    count = db.clear(args.family)
    Console(stderr=True).print(f"deleted {count} entries from {escape(db.url)}")
    return EXIT_OK


_DB_ACTIONS = {"list": _db_list, "show": _db_show, "export": _db_export, "import": _db_import, "clear": _db_clear}
