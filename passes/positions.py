"""Affine index expressions: tensors that are `const + Σ coef[axis] · index_along_axis` of `arange` positions.

Causal and window masks (masks.py) and ALiBi biases (alibi.py) are proven from such expressions. Views that only
insert or drop size-1 axes and slices with static bounds keep an expression affine. A tensor computed from
constants alone at static sizes has one value, whatever ops build it: `constant_value` computes it.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from .graph import arg, aten, constant_fill, is_op, literal_tensor, scalar_value, tensor_val, writers_of

INT64_MAX = 2**63 - 1
CASTS = (aten.to, aten._to_copy, aten.clone, aten.contiguous, aten.alias, aten.lift_fresh_copy, aten.detach)
SHAPE_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.squeeze)


@dataclass(frozen=True)
class Affine:
    """sum(coef[axis] · index_along_axis) + const on a tensor of rank `rank` (axes absolute)."""

    coef: tuple[tuple[int, float], ...]
    const: float
    rank: int

    def shifted(self, new_rank: int, moved_from: int | None = None) -> Affine:
        """Re-index after `unsqueeze(moved_from)` (axes >= moved_from move up) or leading broadcast dims."""
        if moved_from is None:
            delta = new_rank - self.rank
            return Affine(tuple((a + delta, c) for a, c in self.coef), self.const, new_rank)
        return Affine(tuple((a + 1 if a >= moved_from else a, c) for a, c in self.coef), self.const, new_rank)

    def combine(self, other: Affine, sign: float) -> Affine:
        rank = max(self.rank, other.rank)
        a, b = self.shifted(rank), other.shifted(rank)
        coefs: dict[int, float] = dict(a.coef)
        for axis, c in b.coef:
            coefs[axis] = coefs.get(axis, 0.0) + sign * c
        return Affine(tuple(sorted((k, v) for k, v in coefs.items() if v != 0)), a.const + sign * b.const, rank)

    def scaled(self, factor: float) -> Affine:
        return Affine(tuple((a, c * factor) for a, c in self.coef), self.const * factor, self.rank)

    def coef_of(self, axis: int) -> float:
        return dict(self.coef).get(axis, 0.0)


# ------------------------------------------------------------------------------------------------ sizes
def size_expr(d: Any) -> sympy.Expr:
    """A size as a sympy expression (symbolic sizes keep their symbols), compared without adding guards."""
    if isinstance(d, torch.SymInt):
        return sympy.sympify(d.node.expr)
    return sympy.Integer(int(d))


def same_size(a: Any, b: Any) -> bool:
    return bool(sympy.expand(size_expr(a) - size_expr(b)) == 0)


def shape_of(node: Any) -> tuple[Any, ...] | None:
    t = tensor_val(node)
    return tuple(t.shape) if t is not None else None


def non_unit_axes(shape: tuple[Any, ...]) -> list[int]:
    """Axes whose size is not statically 1."""
    return [i for i, d in enumerate(shape) if not (isinstance(d, int) and d == 1)]


# ------------------------------------------------------------------------------------------ expressions
def index_expr(node: Any) -> Affine | None:
    """The node as an affine function of arange positions, or None when it is not one."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return Affine((), float(node), 0)
    if not isinstance(node, fx.Node) or not structure_holds(node):
        return None
    if is_op(node, aten.arange):
        return _arange_expr(node)
    if is_op(node, *CASTS):
        return index_expr(node.args[0])
    if is_op(node, aten.unsqueeze):
        inner = index_expr(node.args[0])
        if inner is None:
            return None
        dim: Any = node.args[1]
        dim = dim + inner.rank + 1 if dim < 0 else dim
        return inner.shifted(inner.rank + 1, moved_from=dim)
    if is_op(node, aten.expand):
        inner = index_expr(node.args[0])
        sizes: Any = node.args[1]
        return inner.shifted(len(sizes)) if inner is not None else None
    if is_op(node, aten.slice):
        return _slice_expr(node)
    if is_op(node, *SHAPE_VIEWS):
        return _view_expr(node)
    if is_op(node, aten.add, aten.sub):  # canonicalize turns `subtract` (einx) into `sub`
        return _add_expr(node)
    if is_op(node, aten.mul):
        return _mul_expr(node)
    if is_op(node, aten.neg):
        inner = index_expr(node.args[0])
        return inner.scaled(-1.0) if inner is not None else None
    if is_op(node, aten.cumsum):
        return _cumsum_expr(node)
    if is_op(node, aten.index):
        return _index_expr(node)
    if is_op(node, aten.diff):
        return _diff_expr(node)
    if is_op(node, *_COMPARISONS):
        return _constant_comparison(node)
    return _constant_expr(node)


_COMPARISONS = {aten.eq: "eq", aten.ne: "ne", aten.lt: "lt", aten.le: "le", aten.gt: "gt", aten.ge: "ge"}
_TRUTH = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
}


def _constant_comparison(node: fx.Node) -> Affine | None:
    """A comparison of two constants is a constant (1 true, 0 false): HF's packed-sequence test of position ids
    that are one arange (`(diff(pos) != 1).cumsum(-1)`) is all 0."""
    lhs, rhs, t = index_expr(node.args[0]), index_expr(node.args[1]), tensor_val(node)
    if lhs is None or rhs is None or t is None or lhs.coef or rhs.coef:
        return None
    name = next(n for packet, n in _COMPARISONS.items() if is_op(node, packet))
    return Affine((), float(_TRUTH[name](lhs.const, rhs.const)), t.dim())


def _index_expr(node: fx.Node) -> Affine | None:
    """x[i0, i1, ...] with an index tensor for every axis of x (transformers' mask functions read positions as
    `position_ids[batch_idx, q_idx]`): x's expression with each axis' index replaced by its index tensor's.
    Index tensors must be affine and never negative (a negative index wraps around)."""
    source, t = index_expr(node.args[0]), tensor_val(node)
    indices: Any = node.args[1]
    if source is None or t is None or not isinstance(indices, (list, tuple)) or len(indices) != source.rank:
        return None
    out = Affine((), source.const, t.dim())
    for axis, index in enumerate(indices):
        expr = index_expr(index) if index is not None else None
        if expr is None or expr.rank > t.dim() or expr.const < 0 or any(c < 0 for _, c in expr.coef):
            return None
        out = out.combine(expr.shifted(t.dim()).scaled(source.coef_of(axis)), 1.0)
    return out


def _diff_expr(node: fx.Node) -> Affine | None:
    """diff(x, n=1) along an axis where x steps by c is c; with `prepend` it must be the value x would have one
    step before index 0 (HF: `diff(pos, prepend=pos[:, :1] - 1)`)."""
    source, t = index_expr(node.args[0]), tensor_val(node)
    n, dim = arg(node, 1, "n", 1), arg(node, 2, "dim", -1)
    prepend, append = arg(node, 3, "prepend"), arg(node, 4, "append")
    if source is None or t is None or n != 1 or append is not None or not isinstance(dim, int):
        return None
    dim = dim + source.rank if dim < 0 else dim
    step = source.coef_of(dim)
    if prepend is not None:
        before = index_expr(prepend)
        if before is None or before.rank != source.rank or before.const != source.const - step:
            return None
        if any(before.coef_of(a) != source.coef_of(a) for a in range(source.rank) if a != dim):
            return None
    return Affine((), step, t.dim())


def _constant_expr(node: Any) -> Affine | None:
    """A tensor every element of which holds one value (`ones`, `full`, ...; see graph.constant_fill)."""
    t, fill = tensor_val(node), constant_fill(node)
    return Affine((), fill, t.dim()) if t is not None and fill is not None and math.isfinite(fill) else None


def _cumsum_expr(node: fx.Node) -> Affine | None:
    """cumsum of a constant c along an axis is c·(index + 1): an all-ones attention mask built in the graph
    (`torch.ones(b, n).cumsum(-1) - 1`, BLOOM's unpadded ALiBi positions before transformers 5.2x) is arange."""
    inner, t = index_expr(node.args[0]), tensor_val(node)
    dim = arg(node, 1, "dim")
    if inner is None or inner.coef or t is None or not isinstance(dim, int) or inner.rank != t.dim():
        return None
    dim = dim + t.dim() if dim < 0 else dim
    return Affine(((dim, inner.const),), inner.const, t.dim())


def _arange_expr(node: fx.Node) -> Affine | None:
    args = [a for a in node.args]
    if node.target == aten.arange.default:
        return Affine(((0, 1.0),), 0.0, 1)
    if node.target == aten.arange.start:
        start = scalar_value(args[0])
        return Affine(((0, 1.0),), start, 1) if start is not None else None
    if node.target == aten.arange.start_step:
        start, step = scalar_value(args[0]), scalar_value(args[2])
        return Affine(((0, step),), start, 1) if start is not None and step is not None else None
    return None


def is_full_slice(node: fx.Node) -> bool:
    start, end, step = arg(node, 2, "start", 0), arg(node, 3, "end", INT64_MAX), arg(node, 4, "step", 1)
    return start in (0, None) and end in (INT64_MAX, None) and step == 1


def slice_start(node: fx.Node) -> int | None:
    """The first index a slice reads, normalized and clamped like Python slicing; None when not static."""
    start, step = arg(node, 2, "start", 0), arg(node, 4, "step", 1)
    shape = shape_of(node.args[0])
    dim = slice_dim(node)
    if shape is None or dim is None or not isinstance(step, int) or step < 1:
        return None
    start = 0 if start is None else start
    size = shape[dim]
    if not isinstance(start, int) or (start < 0 and not isinstance(size, int)):
        return None
    if start < 0:
        return max(start + size, 0)
    return min(start, size) if isinstance(size, int) else start


def slice_dim(node: fx.Node) -> int | None:
    shape = shape_of(node.args[0])
    dim = arg(node, 1, "dim", 0)
    if shape is None or not isinstance(dim, int):
        return None
    return dim + len(shape) if dim < 0 else dim


def _slice_expr(node: fx.Node) -> Affine | None:
    """x[start::step] along one axis: index i reads i·step + start."""
    inner = index_expr(node.args[0])
    if inner is None or is_full_slice(node):
        return inner
    start, dim, step = slice_start(node), slice_dim(node), arg(node, 4, "step", 1)
    if start is None or dim is None or not isinstance(step, int):
        return None
    coef = inner.coef_of(dim)
    coefs = tuple((a, c * step if a == dim else c) for a, c in inner.coef)
    return Affine(coefs, inner.const + coef * start, inner.rank)


def _view_expr(node: fx.Node) -> Affine | None:
    """A view that only inserts or drops size-1 axes keeps every other axis in order."""
    inner = index_expr(node.args[0])
    src, out = shape_of(node.args[0]), shape_of(node)
    if inner is None or src is None or out is None or inner.rank != len(src):
        return None
    src_axes, out_axes = non_unit_axes(src), non_unit_axes(out)
    if len(src_axes) != len(out_axes):
        return None
    moved = dict(zip(src_axes, out_axes, strict=True))
    if not all(same_size(src[a], out[b]) for a, b in moved.items()):
        return None
    # A coefficient on a size-1 axis multiplies index 0 only: it drops out.
    return Affine(tuple(sorted((moved[a], c) for a, c in inner.coef if a in moved)), inner.const, len(out))


def _add_expr(node: fx.Node) -> Affine | None:
    alpha = node.kwargs.get("alpha", 1)
    a, b = index_expr(node.args[0]), index_expr(node.args[1])
    if a is None or b is None or not isinstance(alpha, (int, float)):
        return None
    sign = float(alpha) * (-1.0 if is_op(node, aten.sub) else 1.0)
    return a.combine(b, sign)


def _mul_expr(node: fx.Node) -> Affine | None:
    a, b = index_expr(node.args[0]), index_expr(node.args[1])
    if a is not None and b is not None and not b.coef:
        return a.scaled(b.const)
    if a is not None and b is not None and not a.coef:
        return b.scaled(a.const)
    return None


# ------------------------------------------------------------------------------------------ constant values
MAX_VALUE_ELEMENTS = 1 << 22  # larger tensors are not computed at compile time
MAX_VALUE_NODES = 96
_VALUES: weakref.WeakKeyDictionary[fx.Node, torch.Tensor | None] = weakref.WeakKeyDictionary()  # computed once
_UNINITIALIZED = (aten.empty, aten.empty_like, aten.new_empty, aten.empty_strided)


def constant_value(node: Any) -> torch.Tensor | None:
    """The value of a tensor computed from constants alone (aranges, fills, tensor literals, and any ops on them:
    tril/triu, comparisons, abs, and/or, where, masked_fill...), evaluated on the CPU; None when a graph input or
    module state reaches it, a size is symbolic, an op outside the computation writes it, an op is random or
    uninitialized, or it is too large. Such a tensor is the same at every call of the graph (specialized to its
    sizes)."""
    if not isinstance(node, fx.Node):
        return None
    if node not in _VALUES:
        order = _constant_ancestors(node)
        _VALUES[node] = _evaluate(order) if order is not None else None
    return _VALUES[node]


def _constant_ancestors(node: fx.Node) -> list[fx.Node] | None:
    """`node` and the nodes it is computed from, in graph order; None when one of them is not a constant op."""
    seen: dict[fx.Node, None] = {}
    pending = [node]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        if len(seen) >= MAX_VALUE_NODES or not _evaluable(current):
            return None
        seen[current] = None
        if literal_tensor(current) is None:
            pending.extend(current.all_input_nodes)
    if any(not writers_of(n) <= seen.keys() for n in seen):
        return None  # written by an op outside the computation (in-place ops inside it are replayed in order)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def written_later(node: fx.Node, reader: fx.Node | None = None) -> bool:
    """Whether an op that `node` is not computed from writes its storage: a later reader may see another value
    (in-place ops that build it, like `ones(n, n).triu_(1)`, are among what it is computed from). A `reader` that
    writes it is no such op: an in-place op reads its input before writing it."""
    writers = writers_of(node) - {node, reader}
    if not writers:
        return False
    seen, pending = {node}, [node]
    while pending:
        for n in pending.pop().all_input_nodes:
            if n not in seen:
                seen.add(n)
                pending.append(n)
    return not writers <= seen


def structure_holds(node: Any) -> bool:
    """Whether the op that made `node` and its arguments say what every reader of `node` reads, so a recognizer may
    prove facts from them, and may hand the fused op an input of `node` to read in its place.

    The one check before reading a mask's (or bias') structure: `node` must not be written after it is made, and
    neither may its inputs, but by `node` itself (an input written before `node` read it is not what its own op
    made; one written after would give the fused op, which reads it later, another value). Values computed by
    replaying the in-place ops among a tensor's sources (`constant_value`) need no such check.
    """
    if not isinstance(node, fx.Node):
        return True
    return not written_later(node) and not any(written_later(n, node) for n in node.all_input_nodes)


def _evaluable(node: fx.Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in node.target.tags or is_op(node, *_UNINITIALIZED):
        return False
    t = tensor_val(node)
    return t is not None and all(isinstance(d, int) for d in t.shape) and t.numel() <= MAX_VALUE_ELEMENTS


def _evaluate(order: list[fx.Node]) -> torch.Tensor | None:
    env: dict[fx.Node, Any] = {}
    cpu = torch.device("cpu")
    with torch.no_grad():
        for n in order:
            literal = literal_tensor(n)
            if literal is not None:
                env[n] = literal.detach().to(cpu, copy=True)  # in-place ops below must not write it
                continue
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            kwargs = {**kwargs, "device": cpu} if "device" in kwargs else kwargs
            try:
                env[n] = n.target(*args, **kwargs)  # type: ignore[operator]
            except (RuntimeError, TypeError, ValueError, IndexError):  # an op whose arguments do not replay here
                return None
    value = env[order[-1]]
    return value if isinstance(value, torch.Tensor) else None
