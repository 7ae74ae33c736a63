"""PassManager: run passes in order, tidy and check the graph after each, and name the failing pass in errors."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.fx as fx

from .base import GraphPass, PassContext, PassResult

log = logging.getLogger("tilefuse.passes")


class PassError(RuntimeError):
    """A pass raised or left an invalid graph; the message names it and the passes that ran before."""


def check_graph(gm: fx.GraphModule) -> None:
    """The invariants every pass keeps: the graph lints and every call node carries fake metadata."""
    gm.graph.lint()
    missing = [
        n.name
        for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and "val" not in n.meta
    ]
    if missing:
        raise PassError(f"nodes without meta['val']: {missing[:5]}")


def tidy(gm: fx.GraphModule, modified: bool) -> bool:
    """Drop dead code from `gm` and, when that or a pass (`modified`) changed it, regenerate its code from the
    graph; whether it changed."""
    changed = gm.graph.eliminate_dead_code() or modified
    if changed:
        gm.recompile()
    return changed


class PassManager:
    """Runs passes in order. A pass only rewrites the graph and says whether it did (PassResult.modified): the
    manager then drops the dead code and recompiles (a pass's legality checks count users, so dead ones must go
    before the next pass), and with `check` lints the graph and checks its metadata."""

    def __init__(self, passes: Sequence[GraphPass], check: bool = True) -> None:
        self.passes = list(passes)
        self.check = check

    def __call__(self, gm: fx.GraphModule, ctx: PassContext, where: str | None = None) -> PassResult:
        """Run every pass on `gm`; `where` names the graph in errors and logs (e.g. a checkpoint body)."""
        done: list[str] = []
        modified = False
        place = f" in {where}" if where else ""
        for graph_pass in self.passes:
            try:
                result = graph_pass(gm, ctx)
                changed = result.modified
                # Tidied after the first pass too, whatever it did: the caller's graph may hold dead code. Only
                # then and after a change, since eliminate_dead_code walks the whole graph.
                if changed or not done:
                    changed = tidy(result.graph_module, changed)
                if self.check:
                    check_graph(result.graph_module)
            except Exception as err:
                raise PassError(f"pass {graph_pass.name} failed{place} after {done}: {err}") from err
            gm, modified = result.graph_module, modified or changed
            done.append(graph_pass.name)
            log.debug("pass %s%s: modified=%s", graph_pass.name, place, changed)
        return PassResult(gm, modified)
