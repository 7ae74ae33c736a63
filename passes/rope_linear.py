"""The value of a node as a linear map of one tensor x's last-axis features, with coefficients read from tables.

RoPE is recognized by what it computes, not by how it is written: every element of the rotated value is
`x[..., k]·c + x[..., p(k)]·s` for coefficients c, s read from tensors that do not depend on x. `LinearEvaluator`
interprets the ops between x and a node — views and reshapes of the trailing axes, selects, slices, unbinds,
chunks, cats, stacks, negation, products with tables or constants, sums, complex views and products — and gives,
per element of the node's trailing axes, its terms (feature of x, coefficient). Any other op between x and the node
raises `NotLinear`: the node is not such a map, and callers leave it alone.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .graph import arg, aten, is_op, scalar_value, static_dim, tensor_val
from .match_common import cast_source, widens
from .positions import same_size

MAX_TERMS = 2  # a rotation reads a feature and its partner; more terms is some other linear map
MAX_ELEMENTS = 1 << 16
_MAX_SEARCH = 4096  # nodes visited to tell whether a table reads x


class NotLinear(Exception):
    """The node is not a pair-local linear map of x with table coefficients (not a RoPE candidate)."""


class TableGrowsX(NotLinear):
    """A table would broadcast x's value to a larger shape (the op's output has x's shape)."""


@dataclass(frozen=True, order=True)
class Factor:
    """`table[..., i]`: element `index` (row-major) of the table's trailing `block`; `part` 0/1 reads the real or
    imaginary part of a complex table, -1 a real one."""

    node: fx.Node
    block: tuple[int, ...]
    index: int
    part: int = -1

    def key(self) -> tuple[str, tuple[int, ...], int]:
        return (self.node.name, self.block, self.part)


@dataclass(frozen=True)
class Coef:
    """scale · Π factors."""

    scale: float
    factors: tuple[Factor, ...] = ()

    def times(self, scale: float = 1.0, factor: Factor | None = None) -> Coef:
        extra = (factor,) if factor is not None else ()
        return Coef(self.scale * scale, tuple(sorted(self.factors + extra, key=_factor_order)))

    def tables(self) -> tuple[tuple[str, tuple[int, ...], int], ...]:
        return tuple(f.key() for f in self.factors)


ONE = Coef(1.0)
Term = tuple[int, Coef]  # (feature of x, coefficient)
Elem = tuple[Term, ...] | None  # None: not written yet (an empty buffer's element)


def _factor_order(f: Factor) -> tuple[str, tuple[int, ...], int, int]:
    return (f.node.name, f.block, f.part, f.index)


@dataclass(frozen=True)
class Linear:
    """An x-dependent value: its trailing axes (after x's leading ones) and, row-major over them, each element's
    terms. A complex value keeps (real, imaginary) as a last trailing axis of size 2."""

    trail: tuple[int, ...]
    elems: tuple[Elem, ...]
    complex: bool = False


def _positions(trail: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(math.prod(trail), dtype=torch.int64).reshape(trail)


@functools.lru_cache(maxsize=8)
def _features(size: int) -> Linear:
    """x itself: element k reads feature k (immutable, so every evaluator of an x this wide shares it)."""
    return Linear((size,), tuple(((k, ONE),) for k in range(size)))


def _gathered(lin: Linear, positions: torch.Tensor) -> Linear:
    """The elements of `lin` at `positions` (a tensor of flat indices shaped like the new trailing axes)."""
    return Linear(tuple(positions.shape), tuple(lin.elems[int(i)] for i in positions.flatten()), lin.complex)


def _scaled(elem: Elem, scale: float, factor: Factor | None = None) -> Elem:
    if elem is None:
        return None
    return tuple((k, c.times(scale, factor)) for k, c in elem)


def _summed(*elems: Elem) -> Elem:
    if any(e is None for e in elems):
        return None
    terms: list[Term] = [t for e in elems for t in e]  # type: ignore[union-attr]
    features = [k for k, _ in terms]
    if len(set(features)) != len(features):
        raise NotLinear("a feature of x is read twice by one element")
    if len(terms) > MAX_TERMS:
        raise NotLinear("an element reads more than two features of x")
    return tuple(terms)


class LinearEvaluator:
    """Evaluates x-dependent nodes as `Linear` values of x (memoized); `NotLinear` when one is not."""

    def __init__(self, x: fx.Node, order: dict[fx.Node, int]) -> None:
        shape = tuple(static_dim(d) for d in tensor_val(x).shape)  # type: ignore[union-attr]
        if not shape or shape[-1] is None or shape[-1] > MAX_ELEMENTS:
            raise NotLinear("x has no static last axis")
        self.x, self.lead = x, len(shape) - 1
        self._memo: dict[fx.Node, Linear] = {}
        self._depends: dict[fx.Node, bool] = {x: True}
        self._order = order  # graph position: nodes before x cannot read it

    # ------------------------------------------------------------------------------------------- dependence
    def depends(self, node: Any) -> bool:
        """Whether `node` reads x (x is among its ancestors)."""
        if not isinstance(node, fx.Node):
            return False
        known = self._depends.get(node)
        if known is not None:
            return known
        stack, seen, found = [node], {node}, False
        while stack and not found:
            current = stack.pop()
            for parent in current.all_input_nodes:
                if parent is self.x or self._depends.get(parent):
                    found = True
                    break
                if parent not in seen and self._order.get(parent, len(self._order)) > self._order[self.x]:
                    seen.add(parent)
                    stack.append(parent)
            if len(seen) > _MAX_SEARCH:
                raise NotLinear("too far from x to tell whether it reads x")
        self._depends[node] = found
        return found

    # ------------------------------------------------------------------------------------------- evaluation
    def value(self, node: Any) -> Linear:
        """`node` as a Linear value of x; raises NotLinear."""
        if node is self.x:
            return _features(int(tensor_val(node).shape[-1]))  # type: ignore[union-attr]
        if not isinstance(node, fx.Node) or not self.depends(node):
            raise NotLinear("does not read x")
        if node not in self._memo:
            self._memo[node] = self._evaluate(node)
        return self._memo[node]

    def _evaluate(self, node: fx.Node) -> Linear:
        for packets, rule in RULES:
            if (node.target is operator.getitem and packets == ("getitem",)) or is_op(node, *packets):
                result = rule(self, node)
                if math.prod(result.trail) > MAX_ELEMENTS:
                    raise NotLinear("too many elements")
                return result
        raise NotLinear(f"{node.name} is not a linear op on the trailing axes")

    def trail_of(self, node: fx.Node) -> tuple[int, ...]:
        """The static trailing sizes of `node` after x's leading axes (NotLinear when the leading axes change)."""
        t, x = tensor_val(node), tensor_val(self.x)
        if t is None or x is None or t.dim() < self.lead:
            raise NotLinear("rank below x's leading axes")
        if t.is_complex():
            raise NotLinear("complex value outside view_as_complex")
        if not all(same_size(a, b) for a, b in zip(t.shape[: self.lead], x.shape[: self.lead], strict=True)):
            raise NotLinear("x's leading axes change")
        trail = tuple(static_dim(d) for d in t.shape[self.lead :])
        if any(d is None for d in trail):
            raise NotLinear("symbolic trailing size")
        return trail  # type: ignore[return-value]

    def trailing_dim(self, node: Any, dim: Any) -> int:
        """`dim` of `node` (an x-dependent operand) as an axis of its trailing part."""
        rank = tensor_val(node).dim()  # type: ignore[union-attr]
        if not isinstance(dim, int) or not -rank <= dim < rank or dim % rank < self.lead:
            raise NotLinear("op on x's leading axes")
        return dim % rank - self.lead


# -------------------------------------------------------------------------------------------------- rules
def _identity(ev: LinearEvaluator, node: fx.Node) -> Linear:
    src = node.args[0]
    is_cast = is_op(node, aten._to_copy, aten.to, aten.type_as)
    if is_cast and (cast_source(node) is None or not widens(tensor_val(src).dtype, tensor_val(node).dtype)):  # type: ignore[union-attr]
        raise NotLinear("a narrowing cast")
    return ev.value(src)


def _reshaped(ev: LinearEvaluator, node: fx.Node) -> Linear:
    lin = ev.value(node.args[0])
    if lin.complex:
        raise NotLinear("reshape of a complex value")
    trail = ev.trail_of(node)
    if math.prod(trail) != len(lin.elems):
        raise NotLinear("reshape moves elements across x's leading axes")
    return Linear(trail, lin.elems)


def _indexed(fn: Callable[[torch.Tensor, fx.Node, LinearEvaluator], torch.Tensor]) -> Callable[..., Linear]:
    """A rule that moves elements the way `fn` moves a tensor of their positions."""

    def rule(ev: LinearEvaluator, node: fx.Node) -> Linear:
        src = node.args[0]
        lin = ev.value(src)
        if lin.complex:
            raise NotLinear("indexing a complex value")
        result = _gathered(lin, fn(_positions(lin.trail), node, ev))
        if result.trail != ev.trail_of(node):
            raise NotLinear("unexpected shape")
        return result

    return rule


def viewed(p: torch.Tensor, node: fx.Node, dim: int) -> torch.Tensor:
    """`p` as the select or slice `node` views its input, on axis `dim` of p; NotLinear for a symbolic index."""
    if is_op(node, aten.select):
        index = arg(node, 2, "index", None)
        if not isinstance(index, int):
            raise NotLinear("symbolic select")
        return p.select(dim, index)
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    if not all(v is None or isinstance(v, int) for v in (start, end, step)):
        raise NotLinear("symbolic slice")
    index = [slice(None)] * p.dim()
    index[dim] = slice(start, end, step)
    return p[tuple(index)]


def _select_or_slice(p: torch.Tensor, node: fx.Node, ev: LinearEvaluator) -> torch.Tensor:
    return viewed(p, node, ev.trailing_dim(node.args[0], arg(node, 1, "dim", 0)))


def _permute(p: torch.Tensor, node: fx.Node, ev: LinearEvaluator) -> torch.Tensor:
    src = node.args[0]
    if is_op(node, aten.transpose):
        return p.transpose(ev.trailing_dim(src, node.args[1]), ev.trailing_dim(src, node.args[2]))
    rank = tensor_val(src).dim()  # type: ignore[union-attr]
    dims = [int(d) % rank for d in node.args[1]]  # type: ignore[union-attr,arg-type]
    if dims[: ev.lead] != list(range(ev.lead)):
        raise NotLinear("permute of x's leading axes")
    return p.permute([d - ev.lead for d in dims[ev.lead :]])


def _piece(ev: LinearEvaluator, node: fx.Node) -> Linear:
    """getitem of unbind / chunk / split (and their _with_sizes / _copy variants) on a trailing axis."""
    parent, index = node.args
    if not isinstance(parent, fx.Node) or not is_op(parent, aten.unbind, aten.chunk, aten.split, aten.split_with_sizes):
        raise NotLinear("getitem of another op")
    lin = ev.value(parent.args[0])
    if lin.complex:
        raise NotLinear("indexing a complex value")
    p = _positions(lin.trail)
    dim = ev.trailing_dim(parent.args[0], arg(parent, 1 if is_op(parent, aten.unbind) else 2, "dim", 0))
    if is_op(parent, aten.unbind):
        pieces = p.unbind(dim)
    elif is_op(parent, aten.chunk):
        pieces = p.chunk(parent.args[1], dim)  # type: ignore[arg-type]
    else:
        pieces = p.split(parent.args[1], dim)
    if not isinstance(index, int):
        raise NotLinear("getitem with a non-integer index")
    result = _gathered(lin, pieces[index])
    if result.trail != ev.trail_of(node):
        raise NotLinear("unexpected shape")
    return result


def _joined(ev: LinearEvaluator, node: fx.Node) -> Linear:
    """cat / stack of x-dependent values on a trailing axis."""
    parts = list(node.args[0])  # type: ignore[arg-type]
    dim = arg(node, 1, "dim", 0)
    values = [ev.value(p) for p in parts]
    if any(v.complex for v in values):
        raise NotLinear("joining complex values")
    offsets: list[int] = []
    elems: list[Elem] = []
    for v in values:
        offsets.append(len(elems))
        elems.extend(v.elems)
    positions = [_positions(v.trail) + off for v, off in zip(values, offsets, strict=True)]
    if is_op(node, aten.stack):
        rank = tensor_val(node).dim()  # type: ignore[union-attr]
        if not isinstance(dim, int) or dim % rank < ev.lead:
            raise NotLinear("stack on x's leading axes")
        joined = torch.stack(positions, dim % rank - ev.lead)
    else:
        joined = torch.cat(positions, ev.trailing_dim(parts[0], dim))
    result = _gathered(Linear((len(elems),), tuple(elems)), joined)
    if result.trail != ev.trail_of(node):
        raise NotLinear("unexpected shape")
    return result


def _negated(ev: LinearEvaluator, node: fx.Node) -> Linear:
    lin = ev.value(node.args[0])
    return Linear(lin.trail, tuple(_scaled(e, -1.0) for e in lin.elems), lin.complex)


def _product(ev: LinearEvaluator, node: fx.Node) -> Linear:
    """x-dependent value times a constant or a table (a tensor that does not read x)."""
    if len(node.args) != 2:
        raise NotLinear("mul arity")
    a, b = node.args
    if ev.depends(a) and ev.depends(b):
        raise NotLinear("a product of two values that read x")
    value, table = (a, b) if ev.depends(a) else (b, a)
    lin = ev.value(value)
    number = scalar_value(table)
    if number is not None:
        return Linear(lin.trail, tuple(_scaled(e, number) for e in lin.elems), lin.complex)
    t = tensor_val(table)
    if t is None or not isinstance(table, fx.Node):
        raise NotLinear("multiplier is neither a number nor a tensor")
    return _complex_product(ev, node, lin, table) if lin.complex else _real_product(ev, node, lin, table)


def _table_indices(ev: LinearEvaluator, table: fx.Node, out: fx.Node, lin: Linear) -> tuple[tuple[int, ...], list[int]]:
    """The table's trailing block aligned with the product's trailing axes and, per element of the product, its
    flat index in the block; NotLinear when the table would grow x's leading axes (the op keeps x's shape)."""
    t, v = tensor_val(table), tensor_val(out)
    if t is None or v is None:
        raise NotLinear("no metadata")
    complex_out = lin.complex
    n = len(lin.trail) - (1 if complex_out else 0)
    block = tuple(static_dim(d) for d in t.shape[max(t.dim() - n, 0) :])
    lead = t.shape[: t.dim() - len(block)]
    x_lead = tensor_val(ev.x).shape[: ev.lead]  # type: ignore[union-attr]
    fits = all(same_size(d, 1) or same_size(d, e) for d, e in zip(reversed(lead), reversed(x_lead), strict=False))
    if any(d is None for d in block) or len(lead) > ev.lead or not fits:
        shape, x_shape = list(t.shape), list(tensor_val(ev.x).shape)  # type: ignore[union-attr]
        raise TableGrowsX(
            f"{table.name} of shape {shape} does not broadcast to x of shape {x_shape} without growing it"
        )
    trail = _logical_trail(ev, out) if complex_out else ev.trail_of(out)
    index = _positions(block).broadcast_to(trail)  # type: ignore[arg-type]
    return block, [int(i) for i in index.flatten()]  # type: ignore[return-value]


def _logical_trail(ev: LinearEvaluator, node: fx.Node) -> tuple[int, ...]:
    t = tensor_val(node)
    trail = tuple(static_dim(d) for d in t.shape[ev.lead :])  # type: ignore[union-attr]
    if any(d is None for d in trail):
        raise NotLinear("symbolic trailing size")
    return trail  # type: ignore[return-value]


def _spread(lin: Linear, trail: tuple[int, ...], width: int = 1) -> list[int]:
    """Flat element positions of `lin` broadcast over `trail` (its trailing axes may have size 1)."""
    logical = lin.trail[:-1] if width == 2 else lin.trail
    try:
        p = _positions(logical).broadcast_to(trail)
    except RuntimeError as err:
        raise NotLinear("operands do not broadcast") from err
    return [int(i) for i in p.flatten()]


def _real_product(ev: LinearEvaluator, node: fx.Node, lin: Linear, table: fx.Node) -> Linear:
    if tensor_val(table).is_complex():  # type: ignore[union-attr]
        raise NotLinear("complex table times a real value")
    block, index = _table_indices(ev, table, node, lin)
    trail = ev.trail_of(node)
    spread = _spread(lin, trail)
    elems = tuple(_scaled(lin.elems[p], 1.0, Factor(table, block, i)) for p, i in zip(spread, index, strict=True))
    return Linear(trail, elems)


def _complex_product(ev: LinearEvaluator, node: fx.Node, lin: Linear, table: fx.Node) -> Linear:
    """(a + ib)(c + id) = (ac - bd) + i(ad + bc), per complex element."""
    if not tensor_val(table).is_complex():  # type: ignore[union-attr]
        raise NotLinear("real table times a complex value")
    block, index = _table_indices(ev, table, node, lin)
    trail = _logical_trail(ev, node)
    elems: list[Elem] = []
    for p, i in zip(_spread(lin, trail, 2), index, strict=True):
        re, im = lin.elems[2 * p], lin.elems[2 * p + 1]
        c, d = Factor(table, block, i, 0), Factor(table, block, i, 1)
        elems += [_summed(_scaled(re, 1.0, c), _scaled(im, -1.0, d)), _summed(_scaled(re, 1.0, d), _scaled(im, 1.0, c))]
    return Linear((*trail, 2), tuple(elems), True)


def _sum_or_difference(ev: LinearEvaluator, node: fx.Node) -> Linear:
    a, b = node.args[:2]
    alpha = node.kwargs.get("alpha", 1)
    if not (ev.depends(a) and ev.depends(b)) or alpha != 1:
        raise NotLinear("adds a value that does not read x")
    la, lb = ev.value(a), ev.value(b)
    if la.trail != lb.trail or la.complex != lb.complex or la.trail != _full_trail(ev, node, la):
        raise NotLinear("operands of different shapes")
    sign = -1.0 if is_op(node, aten.sub) else 1.0
    elems = tuple(_summed(ea, _scaled(eb, sign)) for ea, eb in zip(la.elems, lb.elems, strict=True))
    return Linear(la.trail, elems, la.complex)


def _full_trail(ev: LinearEvaluator, node: fx.Node, lin: Linear) -> tuple[int, ...]:
    return lin.trail if lin.complex else ev.trail_of(node)


def _reduced(ev: LinearEvaluator, node: fx.Node) -> Linear:
    """sum over trailing axes: the terms of the summed elements together."""
    lin = ev.value(node.args[0])
    if lin.complex or node.kwargs.get("dtype") is not None:
        raise NotLinear("complex or casting sum")
    dims = arg(node, 1, "dim", None)
    if not isinstance(dims, (list, tuple)) or not dims:
        raise NotLinear("sum over all axes")
    axes = sorted({ev.trailing_dim(node.args[0], d) for d in dims})
    kept = [d for d in range(len(lin.trail)) if d not in axes]
    p = _positions(lin.trail).permute(kept + axes).reshape(-1, math.prod(tuple(lin.trail[d] for d in axes)))
    elems = tuple(_summed(*(lin.elems[int(i)] for i in row)) for row in p)
    return Linear(ev.trail_of(node), elems)


def _as_complex(ev: LinearEvaluator, node: fx.Node) -> Linear:
    lin = ev.value(node.args[0])
    if lin.complex or not lin.trail or lin.trail[-1] != 2:
        raise NotLinear("view_as_complex of a value without (real, imag) pairs")
    return Linear(lin.trail, lin.elems, True)


def _as_real(ev: LinearEvaluator, node: fx.Node) -> Linear:
    lin = ev.value(node.args[0])
    if not lin.complex:
        raise NotLinear("view_as_real of a real value")
    return Linear(lin.trail, lin.elems)


RULES: list[tuple[tuple[Any, ...], Callable[[LinearEvaluator, fx.Node], Linear]]] = [
    ((aten._to_copy, aten.to, aten.type_as, aten.alias, aten.clone, aten.contiguous, aten.lift_fresh_copy), _identity),
    (
        (aten.view, aten.reshape, aten._unsafe_view, aten.unflatten, aten.flatten, aten.unsqueeze, aten.squeeze),
        _reshaped,
    ),
    ((aten.select, aten.slice), _indexed(_select_or_slice)),
    ((aten.permute, aten.transpose), _indexed(_permute)),
    (("getitem",), _piece),
    ((aten.cat, aten.stack), _joined),
    ((aten.neg,), _negated),
    ((aten.mul,), _product),
    ((aten.add, aten.sub), _sum_or_difference),
    ((aten.sum,), _reduced),
    ((aten.view_as_complex,), _as_complex),
    ((aten.view_as_real,), _as_real),
]
