"""Rewrite a softmax written by hand into one `softmax(x, d)` node, so the attention matcher finds its anchor:

    exp(x) / sum(exp(x), d, keepdim=True)   (or `e * reciprocal(sum)`, `e * (1 / sum)`)  →  softmax(x, d)
    exp(logsumexp-normalized x): exp(x - logsumexp(x, d, keepdim=True))                 →  softmax(x, d)
    exp(log_softmax(x, d))                                                               →  softmax(x, d)

The row sum may also drop d and put it back (`[..., None]`, `unsqueeze`, `view`/`reshape`): accepted only when
the result provably has the keepdim shape (symbolic sizes through the shape env). Casts that lose nothing may sit
on either side of the sum (`e.float().sum(...)`, `sum(..., dtype=torch.float32)`, `exp(x).float()`): the division
then runs in the widest dtype W, and the rewrite is `softmax(x, d, dtype=W)`, computed wholly in W: no less
accurate than the chain (which rounds the exp to x's dtype first), and of the dtype the chain returns. A narrowing
cast or a narrower `dtype=` stays as written: eager rounds (or overflows, fp16 past 65504) the statistic there on
purpose or not, and no softmax reproduces that; integer dtypes likewise.

In the first form a shift x = s - stat(s) (or s + -stat(s), the same bits), stat the keepdim amax /
max(...).values / logsumexp of the same s over d (detached or not), is dropped as well: softmax is
shift-invariant along d, in value and gradient. Any other shift (a column max, another dim, another tensor, a
row max added without negation) stays inside: softmax(s - c, d), still exact, which the attention matcher then
declines or takes as an additive bias. Casts after the division stay casts.

Exact in real arithmetic, not bit for bit: rounding differs, and where eager's exp overflows or underflows (the
unshifted form with scores above ~88 in fp32, say) eager gives inf/NaN while the softmax, which shifts by the row
max itself, gives the mathematically correct probabilities. NaN in, or rows that are entirely -inf, give NaN in
both (and 0 once the fused attention kernel takes the site).

The exp, the casts, the row sum and its re-expansion must serve only the normalization: when any has another
user, the hand-written form stays (a softmax next to it would only add work). Shifts, logsumexp and log_softmax
may have other users; they stay for them, and dead-code elimination drops what nothing reads.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph import arg, aten, dtype_of, insert_equivalent, is_op, ndim, tensor_val
from .match_common import cast_source, operand, same_value, widens

_VIEWS = (aten.view, aten.reshape, aten._unsafe_view)


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
    """(s, stat) when `node` is s - stat(s) (or s + -stat(s), the same bits), stat a row statistic of the same s;
    None otherwise."""
    for scores, shift in _shift_operands(node):
        stat = row_statistic(shift)
        if stat is None:
            continue
        source = stat.source
        while is_op(source, aten.detach):  # s.detach().amax(...): the same values
            source, stat = source.args[0], replace(stat, detached=True)
        if same_value(source, scores):
            return scores, stat
    return None


def _shift_operands(node: Any) -> list[tuple[Any, Any]]:
    """The (s, m) readings of `node` as s - m: `sub(s, m)`, `add(s, neg(m))` or `add(neg(m), s)`, alpha 1."""
    if not is_op(node, aten.sub, aten.add) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return []
    a, b = node.args
    if is_op(node, aten.sub):
        return [(a, b)]
    return [(x, negated.args[0]) for x, negated in ((a, b), (b, a)) if is_op(negated, aten.neg)]


def without_row_shift(node: Any, dim: int) -> Any:
    """s for s - stat(s) with stat a row statistic over `dim` (non-negative), which softmax over `dim` ignores;
    `node` itself otherwise."""
    shifted = row_shifted(node)
    return shifted[0] if shifted is not None and shifted[1].dim == dim else node


# ------------------------------------------------------------------------------------ exp(x) / sum(exp(x))
def _reduced_dim(total: fx.Node) -> int | None:
    """d (non-negative) for `sum(x, [d])`, keepdim or not, with no dtype argument or one that widens x's float
    dtype; None otherwise."""
    if total.target is not aten.sum.dim_IntList:
        return None
    dtype, summed = total.kwargs.get("dtype"), dtype_of(operand(total))
    if dtype is not None and (not isinstance(dtype, torch.dtype) or summed is None or not widens(summed, dtype)):
        return None
    dims, rank = arg(total, 1, "dim"), ndim(operand(total))
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or not isinstance(dims[0], int):
        return None
    return dims[0] % rank if rank > 0 else None


def _row_sum(total: Any) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """(sum, d, [total ... sum]) when `total` is sum(x, [d], keepdim=True), or sum(x, [d]) with d put back as a
    size-1 dim by an unsqueeze / view / reshape. The proof is the shape alone: `total` must provably have x's
    shape with d set to 1 (symbolic sizes compared by the shape env); unsqueeze and views keep the row-major
    order, so a result of that shape holds each row's sum in that row."""
    expanded = is_op(total, aten.unsqueeze, *_VIEWS) and bool(total.args)
    reduction = total.args[0] if expanded else total
    if not is_op(reduction, aten.sum):
        return None
    dim, summed, result = _reduced_dim(reduction), tensor_val(operand(reduction)), tensor_val(total)
    if dim is None or summed is None or result is None or result.dim() != summed.dim():
        return None
    keepdim_shape = [1 if i == dim else size for i, size in enumerate(summed.shape)]
    if not all(statically_known_true(a == b) for a, b in zip(result.shape, keepdim_shape, strict=True)):
        return None
    return reduction, dim, [total, reduction] if expanded else [total]


def _upcasts(node: fx.Node) -> list[fx.Node]:
    """`node` and the casts reading it (transitively) that lose nothing."""
    found = [node]
    for reader in found:  # grows while it is walked
        found += [u for u in reader.users if _widened_from(u) is reader]
    return found


def _numerator_and_denominator(node: fx.Node) -> tuple[Any, list[Any]]:
    """(e, [t]) for `e / t`, (e, [reciprocal(t), t]) for `e * reciprocal(t)` or `reciprocal(t) * e`; (None, [])
    otherwise."""
    if node.target is aten.div.Tensor:
        return node.args[0], [node.args[1]]
    if node.target is aten.mul.Tensor:
        args: tuple[Any, ...] = node.args
        for e, inverse in (args, args[::-1]):
            if is_op(inverse, aten.reciprocal):
                return e, [inverse, inverse.args[0]]
    return None, []


def _widening_casts(node: Any) -> list[Any]:
    """[node, ..., source]: `node` and the inputs of the float casts that lose nothing, down to the first value
    that is not such a cast."""
    path = [node]
    while (source := _widened_from(path[-1])) is not None:
        path.append(source)
    return path


def _widened_from(node: Any) -> fx.Node | None:
    """The input of `node` when `node` casts it to a float dtype no narrower than its own; None otherwise."""
    source = cast_source(node)
    source_dtype, dtype = dtype_of(source), dtype_of(node)
    return source if source_dtype is not None and dtype is not None and widens(source_dtype, dtype) else None


def normalized_exp(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(exp node, d) when `node` divides exp(x) by the row sum of exp(x) over d (see `_row_sum`), either side
    possibly upcast first (casts that lose nothing), and nothing but the division reads the chain between."""
    e, denominator = _numerator_and_denominator(node)
    row_sum = _row_sum(denominator[-1]) if denominator else None
    if row_sum is None:
        return None
    reduction, dim, expansion = row_sum
    numerator, summand = _widening_casts(e), _widening_casts(operand(reduction))
    exp = numerator[-1]
    if not is_op(exp, aten.exp) or not same_value(summand[-1], exp):
        return None
    chain = {*numerator, *summand, *denominator, *expansion}
    if not all(set(n.users) <= chain | {node} for n in chain):
        return None
    return exp, dim


def _softmax_of_normalized_exp(node: fx.Node) -> fx.Node | None:
    """softmax(x, d) for exp(x) / Σ_d exp(x), computed in the division's dtype: a dtype no narrower than the exp's
    (the casts allowed between widen), so the softmax is at least as accurate as the chain and of its dtype."""
    found, dtype = normalized_exp(node), dtype_of(node)
    if found is None or dtype is None:
        return None
    e, dim = found
    x = e.args[0]
    unshifted = without_row_shift(x, dim)
    for source in dict.fromkeys((unshifted, x)):  # the unshifted scores first; s - c when a cast gets in the way
        source_dtype = dtype_of(source)
        if source_dtype is None or not widens(source_dtype, dtype):
            continue
        args = (source, dim) if source_dtype == dtype else (source, dim, dtype)
        softmax = insert_equivalent(node, aten.softmax.int, args)
        if softmax is not None:
            return softmax
    return None


# ------------------------------------------------------------------------------------ exp of log-probabilities
def _softmax_of_log_probs(e: fx.Node) -> fx.Node | None:
    """exp(log_softmax(x, d)) or exp(x - logsumexp(x, d, keepdim=True)) → softmax(x, d); an exp that a row sum
    normalizes is left to `_softmax_of_normalized_exp`."""
    x = e.args[0]
    readers = {u for cast in _upcasts(e) for u in cast.users}
    row_summed = any(is_op(u, aten.sum) and _reduced_dim(u) is not None for u in readers)
    if row_summed or any(normalized_exp(u) is not None for u in readers) or not isinstance(x, fx.Node):
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
