"""PassManager: run passes in order, check the graph after each, and name the failing pass in errors."""

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


class PassManager:
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
                if self.check:
                    check_graph(result.graph_module)
            except Exception as err:
                raise PassError(f"pass {graph_pass.name} failed{place} after {done}: {err}") from err
            gm, modified = result.graph_module, modified or result.modified
            done.append(graph_pass.name)
            log.debug("pass %s%s: modified=%s", graph_pass.name, place, result.modified)
        return PassResult(gm, modified)
