"""Q·Kᵀ and P·V written as einsum, whatever the layout: x-transformers' multi-query `b h i d, b j d -> b h i j`,
sequence-major `b q h d, b k h d -> b h q k`, operands swapped. Before a softmax site is matched, the einsums at
its Q·Kᵀ and P·V positions are read as permutes + one matmul (canonicalize_einsum.einsum_as_matmul), so the
matcher sees the one spelling it knows; a site that is then declined gets its einsums back untouched.

(Batched-matmul einsums were already made matmuls, exactly, by the canonicalize pass.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.fx as fx

from .attention_match import CASTS, VIEWS, score_contraction
from .attention_sinks import match_sinks
from .base import Decline
from .canonicalize_einsum import einsum_as_matmul, read_contraction, read_einsum
from .canonicalize_softmax import without_row_shift
from .graph import aten, is_op, ndim, single_user

# Ops between the probabilities and P·V that the matcher walks through (it checks each again).
_PROBS_CHAIN = (*CASTS, *VIEWS, aten.dropout)


@contextmanager
def einsums_read_as_matmul(softmax: fx.Node) -> Iterator[None]:
    """Within the block, the einsums at `softmax`'s Q·Kᵀ and P·V positions are matmul readings; on a Decline
    leaving the block they are put back (the block must not have changed the graph otherwise)."""
    readings = [r for r in map(einsum_as_matmul, _site_einsums(softmax)) if r is not None]
    try:
        yield
    except Decline:
        for reading in reversed(readings):
            reading.undo()
        raise
    for reading in readings:
        reading.commit()


def _site_einsums(softmax: fx.Node) -> list[fx.Node]:
    """The einsum writing the scores this softmax normalizes and the one contracting its probabilities over keys."""
    rank = ndim(softmax)
    sinks = match_sinks(softmax) if softmax.args[1] in (-1, rank - 1) else None
    scores = without_row_shift(sinks.scores if sinks is not None else softmax.args[0], rank - 1)
    found = [score_contraction(scores), _pv_einsum(sinks.probs if sinks is not None else softmax)]
    return [n for n in found if is_op(n, aten.einsum)]  # type: ignore[misc]


def _pv_einsum(probs: fx.Node) -> fx.Node | None:
    """The einsum reached from the probabilities through casts, views and dropout, when it contracts them over
    their last (key) axis; an einsum contracting another axis is no P·V and stays for the matcher to decline."""
    node = probs
    for _ in range(8):
        user = single_user(node)
        if user is None:
            return None
        if is_op(user, aten.einsum):
            return user if _contracts_last_axis(user, node) else None
        if not is_op(user, *_PROBS_CHAIN):
            return None
        node = user
    return None


def _contracts_last_axis(node: fx.Node, probs: fx.Node) -> bool:
    """Whether `node`'s matmul reading has `probs` as its left operand, contracted over its last axis."""
    einsum = read_einsum(node)
    form = read_contraction(einsum.equation, einsum.ranks) if einsum is not None else None
    if einsum is None or form is None:
        return False
    left = einsum.operands[1] if form.swapped else einsum.operands[0]
    return left is probs and form.labels[0][-1] == form.c
