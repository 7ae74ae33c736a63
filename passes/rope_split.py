"""RoPE written on two views of x: `cat(a·cos - b·sin, b·cos + a·sin)` with cos/sin holding one angle per pair.

With a, b the two halves of x (GPT-OSS: `chunk(x, 2)`) this is rotate-half RoPE with the tables doubled,
`cat(cos, cos)`. With a, b the even and odd features (DeepSeek-V3's `apply_rotary_pos_emb_interleave`: pairs laid
out interleaved, rotated output laid out in halves) it is rotate-half RoPE of x de-interleaved
(`x.unflatten(-1, (d/2, 2)).transpose(-1, -2).flatten(-2)`). Either way one `tilefuse::rope` over the whole x.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch.fx as fx

from .base import Decline
from .graph import arg, aten, insert_call, is_op, static_shape
from .match_common import is_last_dim, operand, same_value

# (a, table) orientations of one product: either operand of a mul may be the view of x
_Factor = tuple[Any, Any]


def split_rotation_anchor(node: fx.Node) -> bool:
    """A candidate: cat of a difference and a sum (`cat((a·c - b·s, b·c + a·s), -1)`)."""
    if not is_op(node, aten.cat) or len(operand(node)) != 2:
        return False
    first, second = operand(node)
    return is_op(first, aten.sub) and is_op(second, aten.add)


def _orientations(mul: Any) -> list[_Factor]:
    if not is_op(mul, aten.mul) or len(mul.args) != 2:
        return []
    return [(mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])]


def _candidates(
    p1: Any, p2: Any, t1: Any, t2: Any
) -> Iterator[tuple[tuple[Any, Any], _Factor, _Factor, _Factor, _Factor]]:
    """Every reading of the four products as (a·c, b·s, b·c, a·s): the sum's terms in either order, each product's
    operands in either order."""
    for p3, p4 in ((t1, t2), (t2, t1)):
        for f1, f2, f3, f4 in itertools.product(*map(_orientations, (p1, p2, p3, p4))):
            yield (p3, p4), f1, f2, f3, f4


def _terms(node: fx.Node) -> tuple[Any, Any]:
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        raise Decline(f"{node.name} scales its second term (alpha)")
    return node.args[0], node.args[1]


def match_split_rotation(anchor: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node, fx.Node, str, set[fx.Node]]:
    """(a, b, cos, sin, x, "halves" | "pairs", nodes) of `cat(a·cos - b·sin, b·cos + a·sin)` on the last axis,
    where a, b are views of x's last axis; raises Decline otherwise."""
    from .rope_match import last_dim_view, view_nodes  # rope_match dispatches here: import at call time

    if not is_last_dim(anchor, arg(anchor, 1, "dim", 0)):
        raise Decline("cat of the rotated parts is not along the last axis")
    first, second = operand(anchor)
    (p1, p2), (t1, t2) = _terms(first), _terms(second)
    for (p3, p4), *factors in _candidates(p1, p2, t1, t2):
        (a, c), (b, s), (b2, c2), (a2, s2) = factors
        if not (same_value(a, a2) and same_value(b, b2) and same_value(c, c2) and same_value(s, s2)):
            continue
        va, vb = last_dim_view(a), last_dim_view(b)
        if va is None or vb is None or va[0] is not vb[0]:
            continue
        kind = _pairing(va[1:], vb[1:], (static_shape(va[0]) or (None,))[-1])
        if kind is not None and all(isinstance(t, fx.Node) for t in (c, s)):
            views = view_nodes(a) | view_nodes(b) | view_nodes(a2) | view_nodes(b2)
            nodes = {anchor, first, second, p1, p2, p3, p4} | views
            return a, b, c, s, va[0], kind, {n for n in nodes if isinstance(n, fx.Node)}
    raise Decline("cat(a·cos - b·sin, b·cos + a·sin) whose a, b are not the halves or the even/odd features of x")


def _pairing(a: tuple[int, int, int], b: tuple[int, int, int], size: int | None) -> str | None:
    """Which views a, b are: "halves" (x[..., :d/2], x[..., d/2:]) or "pairs" (x[..., 0::2], x[..., 1::2])."""
    if size is None or size % 2:
        return None
    if a == (0, size // 2, 1) and b == (size // 2, size, 1):
        return "halves"
    if a == (0, size, 2) and b == (1, size, 2):
        return "pairs"
    return None


def deinterleave(graph: fx.Graph, x: fx.Node, size: int) -> fx.Node:
    """x with its even features first, then its odd ones (at the current insertion point)."""
    pairs = insert_call(graph, aten.unflatten.int, (x, -1, [size // 2, 2]))
    halves = insert_call(graph, aten.transpose.int, (pairs, -1, -2))
    return insert_call(graph, aten.flatten.using_ints, (halves, -2, -1))


def doubled(graph: fx.Graph, table: fx.Node) -> fx.Node:
    """`cat(t, t)` along the last axis: a per-pair table as the per-feature table of rotate-half RoPE."""
    return insert_call(graph, aten.cat.default, ([table, table], -1))
