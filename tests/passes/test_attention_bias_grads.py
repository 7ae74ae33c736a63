"""The attention pass passes every bias a gradient can reach to the op (whose backward differentiates it), and
tells a bias that may require grad from a constant mask without the retraced graph's requires_grad flags."""

from __future__ import annotations

import torch
import torch.fx as fx
from _helpers import assert_fused, fuse, tilefuse_nodes
from torch import Tensor, nn

from tilefuse.compiler.capture import capture
from tilefuse.passes.graph import may_require_grad

Q, K, V = (torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))


class LearnedBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 2, 6, 6))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        future = torch.ones(6, 6, dtype=torch.bool).triu(1)
        scores = (q @ k.transpose(-1, -2) * 0.3 + self.bias).masked_fill(future, float("-inf"))
        return scores.softmax(-1) @ v


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, pending = set(), [node]
    while pending:
        for parent in pending.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                pending.append(parent)
    return seen


def test_learned_bias_reaches_the_op_mask() -> None:
    module = LearnedBias()
    gm, ctx = fuse(module, (Q, K, V))
    (spec,) = assert_fused(gm, ctx)
    assert spec.causal and spec.mask == "additive"
    (call,) = tilefuse_nodes(gm, "attention")
    mask = call.args[3]
    assert isinstance(mask, fx.Node) and may_require_grad(mask)
    attributes = [getattr(gm, str(n.target)) for n in {mask} | _ancestors(mask) if n.op == "get_attr"]
    assert any(t is module.bias for t in attributes), gm.code  # the parameter itself: autograd reaches it


def _named(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_may_require_grad_follows_float_tensors_only() -> None:
    def fn(x: Tensor, ids: Tensor) -> tuple[Tensor, ...]:
        learned = x * 2.0  # noqa: F841  (named nodes below)
        pad = torch.where(ids > 0, 0.0, float("-inf"))
        filled = torch.zeros_like(x).masked_fill(ids > 0, float("-inf"))
        return x * 2.0, pad, filled

    gm = capture(fn, (torch.randn(4), torch.arange(4)))
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    learned, pad, filled = outputs
    assert may_require_grad(learned)
    assert not may_require_grad(pad)  # where(pred, 0, -inf): a constant mask
    assert not may_require_grad(filled.args[0])  # zeros_like(x): no gradient reaches x through it
