"""The subcommand record of the `tilefuse` command line, and the subcommands other packages add to it.

A package above the compiler (the benchmarks' `tilefuse bench`) cannot be imported from here without breaking the
package layers, so it adds its command through an entry point of the `tilefuse.commands` group
(pyproject.toml's `[project.entry-points."tilefuse.commands"]`) naming a `Command`; the CLI finds it installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .render import EXIT_FAILED, fail

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tilefuse.commands"


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, how it adds its arguments and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def installed_commands() -> list[Command]:
    """The commands of the `tilefuse.commands` entry points, in name order, each name once (a source checkout's
    egg-info can list them twice). One that does not load becomes a command that says why (taking any arguments),
    so the others still run."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return [_load(found[name]) for name in sorted(found)]


def _load(entry_point: importlib.metadata.EntryPoint) -> Command:
    try:
        command = entry_point.load()
        if not isinstance(command, Command) or command.name != entry_point.name:
            raise TypeError(f"{entry_point.value} is not a Command named {entry_point.name!r}")
        return command
    except Exception as err:  # a broken or half-installed package must not take the other commands down
        log.debug("entry point %s failed to load", entry_point, exc_info=True)
        why = (
            f"tilefuse {entry_point.name} is unavailable: {type(err).__name__}: {err} (entry point {entry_point.value})"
        )
        return Command(entry_point.name, why, _any_arguments, lambda args: fail(why, EXIT_FAILED))


def _any_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
