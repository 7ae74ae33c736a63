"""The PassManager tidies after a pass: dead code dropped and code regenerated when the pass changed the graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.fx as fx

from tilefuse.compiler.capture import capture
from tilefuse.passes.base import PassContext, PassResult
from tilefuse.passes.graph import aten, is_op
from tilefuse.passes.manager import PassManager


def _relu_then_neg(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).neg()


@dataclass(frozen=True)
class _NegToAbs:
    """Rewrites neg(y) to abs(y) without erasing anything: the old neg is left dead."""

    name: str = "neg_to_abs"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for node in [n for n in gm.graph.nodes if is_op(n, aten.neg)]:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(aten.abs.default, (node.args[0],))
            new.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(new)
            modified = True
        return PassResult(gm, modified)


@dataclass(frozen=True)
class _Idle:
    name: str = "idle"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, False)


def _ops(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_dead_code_dropped_and_code_regenerated_after_a_change() -> None:
    x = torch.randn(3, 4)
    gm = capture(_relu_then_neg, (x,))
    result = PassManager([_Idle(), _NegToAbs()])(gm, PassContext())
    assert result.modified
    assert not any("neg" in op for op in _ops(result.graph_module))
    assert "abs" in result.graph_module.code and "neg" not in result.graph_module.code
    torch.testing.assert_close(result.graph_module(x), torch.relu(x).abs())


def test_the_first_pass_drops_the_callers_dead_code() -> None:
    x = torch.randn(3, 4)
    gm = capture(_relu_then_neg, (x,))
    relu = next(n for n in gm.graph.nodes if is_op(n, aten.relu))
    with gm.graph.inserting_after(relu):
        dead = gm.graph.call_function(aten.exp.default, (relu,))
    dead.meta["val"] = relu.meta["val"]
    result = PassManager([_Idle()])(gm, PassContext())
    assert result.modified and dead not in result.graph_module.graph.nodes


def test_dead_code_is_searched_only_after_the_first_pass_and_after_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """eliminate_dead_code walks the whole graph: passes that changed nothing do not pay for it."""
    calls: list[int] = []
    eliminate = fx.Graph.eliminate_dead_code

    def counted(graph: fx.Graph, *args: Any, **kwargs: Any) -> bool:
        calls.append(1)
        return eliminate(graph, *args, **kwargs)

    gm = capture(_relu_then_neg, (torch.randn(3, 4),))
    monkeypatch.setattr(fx.Graph, "eliminate_dead_code", counted)
    PassManager([_Idle(), _Idle(), _NegToAbs(), _Idle()])(gm, PassContext())
    assert len(calls) == 2
