"""Rewrite a softmax written by hand into one `softmax(x, d)` node, so the attention matcher finds its anchor:

    exp(x) / sum(exp(x), d, keepdim=True)   (or `e * reciprocal(sum)`, `e * (1 / sum)`)  →  softmax(x, d)
    exp(logsumexp-normalized x): exp(x - logsumexp(x, d, keepdim=True))                 →  softmax(x, d)
    exp(log_softmax(x, d))                                                               →  softmax(x, d)

In the first form a shift x = s - stat(s), stat the keepdim amax / max(...).values / logsumexp of the same s
over d (detached or not), is dropped as well: softmax is shift-invariant along d, in value and gradient. Any
other shift (a column max, another dim, another tensor) stays inside: softmax(s - c, d), still exact, which the
attention matcher then declines. Casts stay casts.

Exact in real arithmetic, not bit for bit: rounding differs, and where eager's exp overflows or underflows (the
unshifted form with scores above ~88 in fp32, say) eager gives inf/NaN while the softmax, which shifts by the row
max itself, gives the mathematically correct probabilities. NaN in, or rows that are entirely -inf, give NaN in
both (and 0 once the fused attention kernel takes the site).

The exp and the row sum must serve only the normalization: when either has another user, the hand-written form
stays (a softmax next to it would only add work). Shifts, logsumexp and log_softmax may have other users; they
stay for them, and dead-code elimination drops what nothing reads.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any

import torch.fx as fx

from .graph import arg, aten, insert_equivalent, is_op, ndim, single_user
from .match_common import operand, same_value


@dataclass(frozen=True)
class RowStatistic:
    """A keepdim reduction of `source` over one dim `dim` (non-negative) that softmax is invariant to."""

    source: Any
    dim: int
    logsumexp: bool
    detached: bool


def row_statistic(node: Any) -> RowStatistic | None:
    """`node` as amax / max.dim values / logsumexp of a tensor over exactly one dim with keepdim, seen through
    detach; None otherwise."""
    detached = False
    while is_op(node, aten.detach, aten.alias):
        detached, node = detached or is_op(node, aten.detach), node.args[0]
    if is_op(node, operator.getitem) and node.args[1] == 0 and getattr(node.args[0], "target", None) is aten.max.dim:
        reduction = node.args[0]
        source, dims, keepdim = reduction.args[0], [arg(reduction, 1, "dim")], arg(reduction, 2, "keepdim", False)
    elif is_op(node, aten.amax, aten.logsumexp):
        source, dims, keepdim = node.args[0], list(arg(node, 1, "dim", [])), arg(node, 2, "keepdim", False)
    else:
        return None
    rank = ndim(source)
    if not keepdim or len(dims) != 1 or not isinstance(dims[0], int) or rank <= 0:
        return None
    return RowStatistic(source, dims[0] % rank, is_op(node, aten.logsumexp), detached)


def row_shifted(node: Any) -> tuple[Any, RowStatistic] | None:
    """(s, stat) when `node` is s - stat(s), stat a row statistic of the same s; None otherwise."""
    if not is_op(node, aten.sub) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    scores, shift = node.args
    stat = row_statistic(shift)
    if stat is None:
        return None
    source = stat.source
    while is_op(source, aten.detach):  # s.detach().amax(...): the same values
        source, stat = source.args[0], replace(stat, detached=True)
    return (scores, stat) if same_value(source, scores) else None


def without_row_shift(node: Any, dim: int) -> Any:
    """s for s - stat(s) with stat a row statistic over `dim` (non-negative), which softmax over `dim` ignores;
    `node` itself otherwise."""
    shifted = row_shifted(node)
    return shifted[0] if shifted is not None and shifted[1].dim == dim else node


# ------------------------------------------------------------------------------------ exp(x) / sum(exp(x))
def _reduced_dim(total: fx.Node) -> int | None:
    """d (non-negative) for `sum(x, [d], keepdim=True)` with no dtype argument, else None."""
    if total.target is not aten.sum.dim_IntList or total.kwargs.get("dtype") is not None:
        return None
    dims, keepdim, rank = arg(total, 1, "dim"), arg(total, 2, "keepdim", False), ndim(total)
    if not keepdim or not isinstance(dims, (list, tuple)) or len(dims) != 1 or not isinstance(dims[0], int):
        return None
    return dims[0] % rank if rank > 0 else None


def _numerator_and_sum(node: fx.Node) -> tuple[Any, Any]:
    """(e, total) for `e / total`, `e * reciprocal(total)` or `reciprocal(total) * e`; (None, None) otherwise."""
    if node.target is aten.div.Tensor:
        return node.args[0], node.args[1]
    if node.target is aten.mul.Tensor:
        args: tuple[Any, ...] = node.args
        for e, inverse in (args, args[::-1]):
            if is_op(inverse, aten.reciprocal) and single_user(inverse) is node:
                return e, inverse.args[0]
    return None, None


def normalized_exp(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(exp node, d) when `node` divides exp(x) by the keepdim sum of exp(x) over d, and neither the exp nor the
    sum is read by anything else."""
    e, total = _numerator_and_sum(node)
    if not is_op(e, aten.exp) or not isinstance(total, fx.Node) or len(total.users) != 1:
        return None
    dim, summed = _reduced_dim(total), operand(total)
    readers = {node, total}
    if dim is None or not same_value(summed, e) or not set(e.users) | set(summed.users) <= readers:
        return None
    return e, dim


def _softmax_of_normalized_exp(node: fx.Node) -> fx.Node | None:
    found = normalized_exp(node)
    if found is None:
        return None
    e, dim = found
    x = e.args[0]
    unshifted = without_row_shift(x, dim)
    for source in dict.fromkeys((unshifted, x)):  # the unshifted scores first; s - c when a cast gets in the way
        softmax = insert_equivalent(node, aten.softmax.int, (source, dim))
        if softmax is not None:
            return softmax
    return None


# ------------------------------------------------------------------------------------ exp of log-probabilities
def _softmax_of_log_probs(e: fx.Node) -> fx.Node | None:
    """exp(log_softmax(x, d)) or exp(x - logsumexp(x, d, keepdim=True)) → softmax(x, d); an exp that a row sum
    normalizes is left to `_softmax_of_normalized_exp`."""
    x = e.args[0]
    row_summed = any(is_op(u, aten.sum) and _reduced_dim(u) is not None for u in e.users)
    if row_summed or any(normalized_exp(u) is not None for u in e.users) or not isinstance(x, fx.Node):
        return None
    if x.target is aten.log_softmax.int:
        return insert_equivalent(e, aten.softmax.int, x.args, dict(x.kwargs))
    if x.target is aten._log_softmax.default:
        return insert_equivalent(e, aten._softmax.default, x.args, dict(x.kwargs))
    shifted = row_shifted(x)
    if shifted is None or not shifted[1].logsumexp or shifted[1].detached:
        return None  # without the division only the (differentiated) logsumexp normalizes
    return insert_equivalent(e, aten.softmax.int, (shifted[0], shifted[1].dim))


def manual_softmax(node: fx.Node) -> fx.Node | None:
    """Insert the softmax a hand-written chain ending at `node` computes (not yet replacing it), or None."""
    if node.target in (aten.div.Tensor, aten.mul.Tensor):
        return _softmax_of_normalized_exp(node)
    if node.target is aten.exp.default:
        return _softmax_of_log_probs(node)
    return None
