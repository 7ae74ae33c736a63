"""Heads folded into the batch axis: BLOOM-style attention runs Q·Kᵀ and P·V as 3-D bmm on [B*H, N, D] tensors
and views the scores as [B, H, Nq, Nk] around the softmax. These helpers read those views and undo the fold, so
the site becomes an ordinary [B, H, N, D] attention with per-head structure (ALiBi slopes, GQA) visible.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from .graph import aten, insert_call, is_op
from .positions import same_size, shape_of

VIEWS = (aten.view, aten.reshape, aten._unsafe_view)


def split_heads(view: Any) -> int | None:
    """H when `view` reshapes [B*H, X, Y] to [B, H, X, Y]."""
    if not is_op(view, *VIEWS):
        return None
    return _fold(shape_of(view), shape_of(view.args[0]))


def merged_heads(view: Any) -> int | None:
    """H when `view` reshapes [B, H, X, Y] to [B*H, X, Y]."""
    if not is_op(view, *VIEWS):
        return None
    return _fold(shape_of(view.args[0]), shape_of(view))


def _fold(four: tuple[Any, ...] | None, three: tuple[Any, ...] | None) -> int | None:
    if four is None or three is None or len(four) != 4 or len(three) != 3:
        return None
    heads = four[1]
    if not isinstance(heads, int) or not same_size(four[0] * heads, three[0]):
        return None
    return heads if same_size(four[2], three[1]) and same_size(four[3], three[2]) else None


def unfolded_source(node: fx.Node, heads: int) -> fx.Node | None:
    """The [B, H, N, D] tensor that `node` ([B*H, N, D]) reshapes, when the graph holds it."""
    source = node.args[0] if merged_heads(node) == heads else None
    return source if isinstance(source, fx.Node) else None


def unfold_heads(graph: fx.Graph, node: fx.Node, heads: int) -> fx.Node:
    """[B*H, ...] as [B, H, ...] (a size-1 leading axis broadcasts as [1, 1, ...]); inserts at the current point.

    A rank-4 node is taken as already unfolded."""
    source = unfolded_source(node, heads)
    if source is not None:
        return source
    shape = shape_of(node) or ()
    if len(shape) == 4:
        return node
    if shape and same_size(shape[0], 1):
        return insert_call(graph, aten.unsqueeze.default, (node, 0))
    return insert_call(graph, aten.unflatten.int, (node, 0, [-1, heads]))


def merge_heads(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """[B, H, ...] back to [B*H, ...]; inserts at the current point."""
    return insert_call(graph, aten.flatten.using_ints, (node, 0, 1))
