"""Attention sinks (GPT-OSS): a per-head logit column joins the scores on the key axis, takes part in the softmax,
and is dropped before P·V.

With Z = Σ exp(S) and sink logit s per row, softmax([S, s])[..., :-1]·V = softmax(S)·V · Z / (Z + e^s)
= out · sigmoid(lse - s), lse = log Z. So a site with sinks is plain attention (tilefuse::attention returns lse
too) followed by that rescale, whose gradient reaches the sinks through autograd and lse through the op's
backward. A fully masked row has lse = -inf: sigmoid gives 0 and the output is 0, as in eager, where the sink
takes all the weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .canonicalize_softmax import without_row_shift
from .graph import arg, aten, getitem, insert_call, is_op, ndim, single_user, static_shape, tensor_val

_CASTS = (aten.to, aten._to_copy, aten.type_as, aten.clone, aten.contiguous, aten.alias)
# Ops that broadcast or re-view the per-head sink logits into the [B, H, Nq, 1] column.
_BROADCASTS = (aten.expand, aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, *_CASTS)


@dataclass(frozen=True)
class SinkSite:
    """A softmax over [scores, sink column] on the key axis whose sink column is then sliced away."""

    scores: fx.Node  # the scores without the sink column
    column: fx.Node  # [B or 1, H, Nq or 1, 1] sink logits, broadcast from a per-head tensor
    probs: fx.Node  # the probabilities of the keys alone (the slice), which P·V reads


def match_sinks(softmax: fx.Node) -> SinkSite | None:
    """The sink pattern around `softmax` (a softmax over the last axis), or None when it has no sink column."""
    rank = ndim(softmax)
    widened = without_row_shift(softmax.args[0], rank - 1)  # the row max is taken over the sink column too
    if rank != 4 or not is_op(widened, aten.cat):
        return None
    pieces, dim = arg(widened, 0, "tensors"), arg(widened, 1, "dim", 0)
    if not isinstance(dim, int) or dim % rank != rank - 1 or not isinstance(pieces, (list, tuple)) or len(pieces) != 2:
        return None
    scores, column = pieces
    if not isinstance(scores, fx.Node) or not isinstance(column, fx.Node):
        return None
    scores_val = tensor_val(scores)
    if scores_val is None or not _is_head_column(column, scores_val.shape[1]):
        return None
    key_len = static_shape(scores)[-1]
    probs = _keys_slice(softmax, key_len)
    return SinkSite(scores, column, probs) if probs is not None else None


def _is_head_column(column: fx.Node, heads: Any) -> bool:
    """Whether `column` is one logit per row, broadcast from at most one value per head (sizes may be symbolic:
    the shape env decides)."""
    shape = static_shape(column)
    if len(shape) != 4 or shape[-1] != 1:
        return False
    source: Any = column
    while is_op(source, *_BROADCASTS):
        source = source.args[0]
    value = tensor_val(source)
    return value is not None and any(statically_known_true(value.numel() == n) for n in (1, heads))


def _keys_slice(softmax: fx.Node, key_len: int | None) -> fx.Node | None:
    """The only consumer of the probabilities, through casts: a slice of the last axis keeping the first
    `key_len` columns (all but the sink's; with a symbolic `key_len`, spelled [..., :-1]); None otherwise."""
    node = softmax
    user = single_user(node)
    while user is not None and is_op(user, *_CASTS):
        node, user = user, single_user(user)
    if user is None or user.target is not aten.slice.Tensor or user.args[0] is not node:
        return None
    dim, start, end, step = (arg(user, i, name, default) for i, name, default in
                             ((1, "dim", 0), (2, "start", None), (3, "end", None), (4, "step", 1)))  # fmt: skip
    if not isinstance(dim, int) or dim % 4 != 3 or not all(isinstance(x, int) or x is None for x in (start, end, step)):
        return None
    if (start or 0, step) != (0, 1) or end is None:
        return None
    if key_len is None:
        return user if end == -1 else None
    width = key_len + 1
    return user if (end + width if end < 0 else min(end, width)) == key_len else None


def rescale_by_sinks(graph: fx.Graph, call: fx.Node, out: fx.Node, column: fx.Node) -> fx.Node:
    """out · sigmoid(lse - sink) from the attention call's (out, lse), in fp32 (lse's dtype); the caller casts
    the result back to the site's dtype."""
    lse = insert_call(graph, aten.unsqueeze.default, (getitem(graph, call, 1), -1))
    weight = insert_call(graph, aten.sigmoid.default, (insert_call(graph, aten.sub.Tensor, (lse, column)),))
    return insert_call(graph, aten.mul.Tensor, (out, weight))
