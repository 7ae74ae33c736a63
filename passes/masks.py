"""Prove causal and sliding-window structure from how an attention mask is built.

A mask is read as a conjunction of atoms. Atoms built from `arange` positions (comparisons, tril/triu of constant
tensors) become linear constraints `cq·q + ck·k + c (<=|<|>=|>|==) 0` over query position q (axis -2 of the
scores) and key position k (axis -1). Everything else is a data atom that stays a tensor the kernel reads.
Causal and window flags let the kernel skip whole blocks instead of reading an N×N mask.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .buffer_masks import band_from_value, band_of
from .graph import arg, aten, constant_fill, dtype_of, is_op, ndim, scalar_value, static_shape, stored
from .mask_values import only_keep_values
from .positions import CASTS as _CASTS
from .positions import (
    SHAPE_VIEWS,
    constant_value,
    index_expr,
    is_full_slice,
    non_unit_axes,
    same_size,
    shape_of,
    slice_dim,
    slice_start,
    structure_holds,
    written_later,
)

__all__ = ["index_expr", "is_full_slice"]  # re-exported: the attention matcher reads them from here

# Fill values at or below this count as "masked out" where they replace a score (HF uses finfo.min; older code -1e4
# or -1e9). A fill added to the scores must absorb them as well (absorbs_scores).
NEG_FILL_LIMIT = -1e4


@dataclass(frozen=True)
class Constraint:
    """cq·q + ck·k + c  <op>  0, with op one of le, lt, ge, gt, eq, ne; `node` (negated or not) built it."""

    cq: float
    ck: float
    c: float
    op: str
    node: fx.Node | None = field(default=None, compare=False)
    negated: bool = field(default=False, compare=False)


@dataclass
class MaskFacts:
    """A conjunction: linear constraints plus data atoms (node, negated)."""

    constraints: list[Constraint] = field(default_factory=list)
    data: list[tuple[fx.Node, bool]] = field(default_factory=list)

    def merge(self, other: MaskFacts) -> MaskFacts:
        return MaskFacts(self.constraints + other.constraints, self.data + other.data)


# ------------------------------------------------------------------------------------------- boolean masks
_COMPARE = {aten.le: "le", aten.lt: "lt", aten.ge: "ge", aten.gt: "gt", aten.eq: "eq", aten.ne: "ne"}
_NEGATE = {"le": "gt", "lt": "ge", "ge": "lt", "gt": "le", "eq": "ne", "ne": "eq"}


def analyze_keep(node: Any, negate: bool = False) -> MaskFacts:
    """Facts of a boolean keep-mask (True = attend). Never raises: unknown structure becomes a data atom, unless
    it is computed from constants alone and its value is a band (whatever ops built it)."""
    facts = _analyze(node, negate)
    if not facts.data:
        return facts
    out = MaskFacts(constraints=facts.constraints)
    for atom, negated in facts.data:
        out = out.merge(_from_value(atom, negated))
    return out


def _analyze(node: Any, negate: bool) -> MaskFacts:
    if not isinstance(node, fx.Node) or (_is_all_true(node) and not negate):
        return MaskFacts()
    if not structure_holds(node):  # its structure says what it was built as, not what the site reads
        return MaskFacts(data=[(node, negate)])
    for packet, name in _COMPARE.items():
        if is_op(node, packet):
            constraint = _compare(node, name, negate)
            if constraint is not None:
                return MaskFacts(constraints=[constraint])
            return _truthiness(node, name, negate)
    if is_op(node, aten.bitwise_not, aten.logical_not):
        return analyze_keep(node.args[0], not negate)
    conj = _conjunction_operands(node)
    if conj is not None and not negate:
        return analyze_keep(conj[0]).merge(analyze_keep(conj[1]))
    disj = _disjunction_operands(node)
    if disj is not None and negate:  # not (a or b) is (not a) and (not b): masks OR-ed as "masked out" positions
        return analyze_keep(disj[0], True).merge(analyze_keep(disj[1], True))
    if is_op(node, *_CASTS, aten.expand) or (is_op(node, aten.slice) and is_full_slice(node)):
        return analyze_keep(node.args[0], negate)
    if is_op(node, aten.slice):
        return _sliced(node, negate)
    if is_op(node, *SHAPE_VIEWS):
        return _viewed(node, negate)
    selected = _selected_truthiness(node, negate)
    if selected is not None:
        return selected
    if is_op(node, aten.unsqueeze) and ndim(node) >= 2 and _unsqueeze_is_leading(node):
        inner = analyze_keep(node.args[0], negate)  # data atoms must keep the unsqueezed rank: the whole is one
        return inner if not inner.data else MaskFacts(inner.constraints, [(node, negate)])
    tri = _triangle(node)
    if tri is not None:
        return MaskFacts(constraints=[_maybe_negate(tri, negate)])
    return MaskFacts(data=[(node, negate)])


def _from_value(node: fx.Node, negate: bool) -> MaskFacts:
    """A mask whose value is known and a band: a module buffer (a registered `tril(ones)`, proven and guarded by
    buffer_masks) or a tensor computed from constants alone (positions.constant_value); else a data atom."""
    band = band_of(node, negate) if not written_later(node) else None  # the graph writes the buffer it was given
    if band is None:
        value = constant_value(node)
        band = band_from_value(value, negate) if value is not None else None
    if band is None:
        return MaskFacts(data=[(node, negate)])
    bounds = [(-band.upper, "le")] if band.upper is not None else []
    bounds += [(-band.lower, "ge")] if band.lower is not None else []
    constraints = [Constraint(-1.0, 1.0, float(c), op, node, negate) for c, op in bounds]
    return MaskFacts(constraints=_pin_unit_axes(constraints, node))


def _sliced(node: fx.Node, negate: bool) -> MaskFacts:
    """x[start::step] along one axis of a positional mask: index i of the slice reads index i·step + start of x,
    so each constraint of x is shifted (and scaled) along that axis. Data atoms are kept whole as the slice."""
    rank, dim, start, step = ndim(node), slice_dim(node), slice_start(node), arg(node, 4, "step", 1)
    inner = analyze_keep(node.args[0], negate)
    if inner.data or dim is None or start is None or not isinstance(step, int) or step < 1:
        return MaskFacts(data=[(node, negate)])
    shifted = []
    for c in inner.constraints:
        cq, ck, const = c.cq, c.ck, c.c
        if dim == rank - 2:
            cq, const = cq * step, const + cq * start
        elif dim == rank - 1:
            ck, const = ck * step, const + ck * start
        shifted.append(Constraint(cq, ck, const, c.op, node, negate))
    return MaskFacts(constraints=_pin_unit_axes(shifted, node))


def _viewed(node: fx.Node, negate: bool) -> MaskFacts:
    """A view that keeps the query and key axes last and only adds or drops leading size-1 axes keeps every
    position's value (T5 under SDPA views its causal mask to [1, 1, Nq, Nk]). Data atoms are kept as the view."""
    src, out = shape_of(node.args[0]), shape_of(node)
    inner = analyze_keep(node.args[0], negate)
    if src is None or out is None or len(src) < 2 or len(out) < 2 or inner.data:
        return MaskFacts(data=[(node, negate)])
    lead_src, lead_out = src[:-2], out[:-2]
    same_lead = [lead_src[a] for a in non_unit_axes(lead_src)] == [lead_out[a] for a in non_unit_axes(lead_out)]
    if not (same_lead and same_size(src[-2], out[-2]) and same_size(src[-1], out[-1])):
        return MaskFacts(data=[(node, negate)])
    return inner


def _pin_unit_axes(constraints: list[Constraint], node: fx.Node) -> list[Constraint]:
    """A mask of size 1 along the query (or key) axis is broadcast there: every position reads its index 0, so the
    position drops out of the constraint."""
    shape = static_shape(node)
    pin_q, pin_k = len(shape) >= 2 and shape[-2] == 1, len(shape) >= 1 and shape[-1] == 1
    return [
        Constraint(0.0 if pin_q else c.cq, 0.0 if pin_k else c.ck, c.c, c.op, c.node, c.negated) for c in constraints
    ]


def _truthiness(node: fx.Node, op: str, negate: bool) -> MaskFacts:
    """`x == 0` as `not x` and `x != 0` as `x` when x has positional structure (`tril(ones(n, n)) == 0`)."""
    if op in ("eq", "ne") and scalar_value(node.args[1]) == 0.0:
        inner = analyze_keep(node.args[0], negate ^ (op == "eq"))
        if inner.constraints:
            return inner
    return MaskFacts(data=[(node, negate)])


def _selected_truthiness(node: fx.Node, negate: bool) -> MaskFacts | None:
    """where(pred, a, b) of constants, one zero and one not, read by truthiness: pred, or not pred (MPT casts HF's
    additive mask `where(keep, 0, min)` to bool and masks where it is True)."""
    if not is_op(node, aten.where) or len(node.args) != 3:
        return None
    a, b = constant_fill(node.args[1]), constant_fill(node.args[2])
    if a is None or b is None or (a != 0) == (b != 0):
        return None
    return analyze_keep(node.args[0], negate ^ (a == 0))


def _is_all_true(node: fx.Node) -> bool:
    """A constant all-True (or all-ones) tensor nothing writes, e.g. HF's `new_ones((), dtype=bool)` seed of a mask,
    or an all-ones attention mask built in the graph and indexed by positions (transformers before 5.2x)."""
    return constant_fill(node) == 1.0


def _unsqueeze_is_leading(node: fx.Node) -> bool:
    """unsqueeze that adds an axis before the last two (the query/key axes keep their places from the end)."""
    dim: Any = node.args[1]
    rank = ndim(node)
    dim = dim + rank if dim < 0 else dim
    return dim < rank - 2


def _conjunction_operands(node: fx.Node) -> tuple[Any, Any] | None:
    if is_op(node, aten.bitwise_and, aten.logical_and, aten.mul, aten.__and__):
        return node.args[0], node.args[1]
    if node.op == "call_function" and node.target is operator.and_:
        return node.args[0], node.args[1]
    return None


def _disjunction_operands(node: fx.Node) -> tuple[Any, Any] | None:
    if is_op(node, aten.bitwise_or, aten.logical_or, aten.__or__):
        return node.args[0], node.args[1]
    if node.op == "call_function" and node.target is operator.or_:
        return node.args[0], node.args[1]
    return None


def _maybe_negate(c: Constraint, negate: bool) -> Constraint:
    return Constraint(c.cq, c.ck, c.c, _NEGATE[c.op], c.node, negate) if negate else c


def _compare(node: fx.Node, op: str, negate: bool) -> Constraint | None:
    lhs, rhs = index_expr(node.args[0]), index_expr(node.args[1])
    if lhs is None or rhs is None:
        return None
    diff = lhs.combine(rhs, -1.0)
    rank = diff.rank
    cq = ck = 0.0
    for axis, coef in diff.coef:
        if axis == rank - 1:
            ck = coef
        elif axis == rank - 2:
            cq = coef
        else:
            return None  # depends on batch/head position: not a positional mask
    return _maybe_negate(Constraint(cq, ck, diff.const, op, node), negate)


def _triangle(node: fx.Node) -> Constraint | None:
    """tril/triu of a nonzero constant: nonzero (True) where k - q <= d (tril) or k - q >= d (triu)."""
    if not is_op(node, aten.tril, aten.triu):
        return None
    fill = constant_fill(node.args[0])
    if fill is None or fill == 0.0:
        return None
    diagonal = float(arg(node, 1, "diagonal", 0))
    op = "le" if is_op(node, aten.tril) else "ge"
    return Constraint(-1.0, 1.0, -diagonal, op, node)


# ------------------------------------------------------------------------------------------ additive masks
def keep_from_additive(node: fx.Node) -> tuple[fx.Node, bool] | None:
    """(pred, negated) when `node` is where(pred, 0, fill) (or swapped), triu/tril of a fill constant, or any tensor
    whose every value is 0 or a fill (read as: kept where 0), for a fill that absorbs the scores (absorbs_scores);
    a mask with another fill stays additive."""
    dtype = dtype_of(node)
    if only_keep_values(node, lambda v: absorbs_scores(v, dtype)):  # value reading checks writes itself
        return node, True
    if not structure_holds(node):
        return None
    if is_op(node, aten.tril, aten.triu) and added_fill_masks(node.args[0], node):
        return node, True  # the fill (masked) where the triangle is nonzero
    if not is_op(node, aten.where) or len(node.args) != 3:
        return None
    pred, a, b = node.args
    if not isinstance(pred, fx.Node):
        return None
    va, vb = (stored(constant_fill(x), dtype) for x in (a, b))  # a constant branch only broadcasts the mask
    if va == 0.0 and absorbs_scores(vb, dtype):
        return pred, False
    if vb == 0.0 and absorbs_scores(va, dtype):
        return pred, True
    return None


def added_fill_masks(fill: Any, mask: fx.Node) -> bool:
    """Whether `fill`, a number or constant tensor that fills part of the additive mask `mask`, masks out the
    scores it is added to (absorbs_scores, in `mask`'s dtype)."""
    dtype = dtype_of(mask)
    return absorbs_scores(stored(constant_fill(fill), dtype), dtype)


def absorbs_scores(fill: float | None, dtype: torch.dtype | None) -> bool:
    """Whether adding `fill` (stored in `dtype`) masks a score out the way the fused op does, fully masked rows
    included: -inf (eager gives NaN there, the op 0), or a value within a factor 2 of the most negative finite
    `dtype` value (HF's finfo.min), which absorbs a score of any ordinary size, so eager's fully masked rows do not
    depend on the scores and the op gives 0. A smaller fill like -1e4 masks partially masked rows only: eager's
    fully masked rows stay a softmax of the scores, so such a mask is kept additive."""
    if fill is None or dtype is None or not dtype.is_floating_point:
        return False
    return fill == -math.inf or fill <= torch.finfo(dtype).min / 2


def is_very_negative(value: Any) -> bool:
    """A fill that masks a score out where it replaces it (masked_fill or where on the scores)."""
    v = scalar_value(value)
    return v is not None and v <= NEG_FILL_LIMIT


@dataclass(frozen=True)
class PositionalMask:
    causal: bool = False
    align: str = "top_left"
    window: int | None = None


def classify(
    constraints: list[Constraint], q_len: Any, kv_len: Any
) -> tuple[PositionalMask, list[tuple[fx.Node, bool]]]:
    """Causal/window flags from the constraints; constraints the flags cannot state come back as data atoms.

    Each constraint bounds the distance k - q. The tightest upper bound is causal when it is 0 (top-left) or
    kv_len - q_len (bottom-right); the tightest lower bound is a window counted from the same aligned query
    position, when the upper side is causal or unbounded. Looser bounds of the same side are implied by the
    tightest one and dropped.
    """
    uppers: list[tuple[int, Constraint]] = []
    lowers: list[tuple[int, Constraint]] = []
    other: list[Constraint] = []
    for c in constraints:
        if c.cq == 0 and c.ck == 0 and _holds(c):
            continue  # true at every position (HF's packed-sequence test on one sequence): keeps everything
        bound = _distance_bound(c)
        if bound is None:
            other.append(c)
        else:
            (uppers if bound[0] == "upper" else lowers).append((bound[1], c))
    offset = _causal_offset(min((u for u, _ in uppers), default=None), q_len, kv_len)
    if offset is None:
        other += [c for _, c in uppers]
    # A lower bound is a window only beside a causal upper bound or none: with another upper bound it is one side
    # of a two-sided band (a symmetric window), which stays a data mask (see AttentionSpec.window).
    lower = max((lo for lo, _ in lowers), default=None) if offset is not None or not uppers else None
    window = _window(lower, offset or 0)
    if window is None:
        other += [c for _, c in lowers]
    facts = PositionalMask(offset is not None, "bottom_right" if offset else "top_left", window)
    return facts, [(c.node, c.negated) for c in other if c.node is not None]


def distance_upper(constraints: list[Constraint]) -> int | None:
    """The tightest U with k - q <= U implied by one of the constraints (a causal mask, aligned or not); None."""
    bounds = [b[1] for b in map(_distance_bound, constraints) if b is not None and b[0] == "upper"]
    return min(bounds, default=None)


def _holds(c: Constraint) -> bool:
    """Whether a constraint without q or k terms (c <op> 0) is true."""
    return {"le": c.c <= 0, "lt": c.c < 0, "ge": c.c >= 0, "gt": c.c > 0, "eq": c.c == 0, "ne": c.c != 0}[c.op]


def _distance_bound(c: Constraint) -> tuple[str, int] | None:
    """("upper", U) for k - q <= U or ("lower", L) for k - q >= L, over integer positions; None otherwise."""
    if c.ck == 0 or c.cq != -c.ck:
        return None
    op = c.op if c.ck > 0 else _NEGATE_FLIP[c.op]
    bound = -c.c / c.ck  # (k - q) <op> bound
    if not math.isfinite(bound):
        return None
    if op == "le":
        return "upper", math.floor(bound)
    if op == "lt":
        return "upper", math.ceil(bound) - 1
    if op == "ge":
        return "lower", math.ceil(bound)
    if op == "gt":
        return "lower", math.floor(bound) + 1
    return None


_NEGATE_FLIP = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt", "eq": "eq", "ne": "ne"}


def _causal_offset(upper: int | None, q_len: Any, kv_len: Any) -> int | None:
    """Query position offset (0: top-left, kv_len - q_len: bottom-right) of a causal bound k - q <= upper."""
    if upper == 0:
        return 0
    if upper is not None and isinstance(q_len, int) and isinstance(kv_len, int) and upper == kv_len - q_len:
        return upper
    return None


def _window(lower: int | None, offset: int) -> int | None:
    """Window W with (q + offset) - k < W equivalent to k - q >= lower; None when there is none (W < 1)."""
    if lower is None:
        return None
    window = offset - lower + 1
    return window if window >= 1 else None


def is_bool(node: Any) -> bool:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool
