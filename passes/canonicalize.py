"""Canonicalize: rewrite spellings into one form and remove ops that cannot change a value, so recognizers see
fewer spellings.

Only exact identities: in-place ops on intermediates become functional, batched-matmul einsums become `matmul`,
a constant-filled `where` branch becomes a scalar, and casts to the same dtype, inactive dropout and
multiplication by one in a float dtype go. Everything that could change a value's bits, NaN/Inf/-0 behaviour,
the strides a later view sees, or aliasing stays. One rewrite is exact in real arithmetic but not bit for bit: a
softmax written by hand with exp and sum becomes `softmax` (canonicalize_softmax.py says when, and what differs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .base import PassContext, PassResult
from .canonicalize_einsum import einsum_to_matmul
from .canonicalize_inplace import functionalize
from .canonicalize_softmax import manual_softmax
from .graph import arg, aten, constant_fill, dtype_of, insert_equivalent, is_mutated, is_op, scalar_value


def _identity_input(node: fx.Node) -> fx.Node | None:
    """The input `node` passes through unchanged, or None."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or dtype_of(source) is None or dtype_of(source) != dtype_of(node):
        return None
    if is_op(node, aten.to) and node.target in (aten.to.dtype,) and len(node.args) == 2 and not node.kwargs:
        return source
    # A run-time p (dynamic=True) is left to the attention pass, which specializes it only where it fuses.
    if is_op(node, aten.dropout) and (not arg(node, 2, "train", False) or scalar_value(arg(node, 1, "p", 0.0)) == 0.0):
        return source
    if is_op(node, aten.mul) and scalar_value(node.args[1]) == 1.0 and not isinstance(node.args[1], fx.Node):
        return source if _float_copy_removable(source, node) else None
    if _is_full_slice(node):  # `x[:, :, None]` under dynamic=True keeps a `:` slice of dim 0 as an op
        return source if not is_mutated(source) and not is_mutated(node) else None
    return None


def _is_full_slice(node: fx.Node) -> bool:
    """aten.slice(x, dim, 0 or None, end, 1) with an end no size can exceed (Python's `:`): a view equal to x."""
    if node.target is not aten.slice.Tensor:
        return False
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    return start in (None, 0) and step == 1 and (end is None or (isinstance(end, int) and end >= sys.maxsize))


def _float_copy_removable(source: fx.Node, copy: fx.Node) -> bool:
    """`x * 1` is a copy of a float x: dropping it merges two storages, exact only while neither is written."""
    dtype = dtype_of(source)
    return dtype is not None and dtype.is_floating_point and not is_mutated(source) and not is_mutated(copy)


def where_scalar_fill(node: fx.Node) -> fx.Node | None:
    """`where(c, a, full_like(a, v))` → `where(c, a, v)` (and the mirrored form), when the result keeps its shape,
    dtype and strides: `where` selects, so a constant branch acts exactly as its value would."""
    if node.target is not aten.where.self:
        return None
    cond, a, b = node.args
    forms = ((aten.where.ScalarOther, (cond, a, _fill_scalar(b))), (aten.where.ScalarSelf, (cond, _fill_scalar(a), b)))
    for target, args in forms:
        rewritten = insert_equivalent(node, target, args) if None not in args else None
        if rewritten is not None:
            return rewritten
    return None


def _fill_scalar(x: Any) -> bool | int | float | None:
    """The Python number a constant-filled tensor holds, of its dtype's kind (so promotion treats both alike)."""
    value, dtype = constant_fill(x) if isinstance(x, fx.Node) else None, dtype_of(x)
    if value is None or dtype is None:
        return None
    if dtype == torch.bool:
        return bool(value)
    return value if dtype.is_floating_point else int(value)


def _alias_overloads() -> dict[Any, Any]:
    """ATen's alias ops (`subtract`, `multiply`, `greater`, ...) → the op they alias, overload by overload where
    the schemas agree (einx and other libraries call the long names; recognizers match the short ones)."""
    pairs = (("subtract", "sub"), ("multiply", "mul"), ("divide", "div"), ("true_divide", "div"), ("greater", "gt"),
             ("greater_equal", "ge"), ("less", "lt"), ("less_equal", "le"), ("not_equal", "ne"), ("negative", "neg"),
             ("absolute", "abs"), ("clip", "clamp"), ("arctan", "atan"))  # fmt: skip
    table: dict[Any, Any] = {}
    for alias_name, name in pairs:
        alias, canonical = getattr(aten, alias_name), getattr(aten, name)
        for overload in alias.overloads():
            if "out" in overload or overload not in canonical.overloads():
                continue
            a, c = getattr(alias, overload), getattr(canonical, overload)
            if _signature(a) == _signature(c):
                table[a] = c
    return table


def _signature(op: Any) -> list[tuple[str, str]]:
    return [(x.name, str(x.type)) for x in op._schema.arguments]


_ALIASES = _alias_overloads()


def alias_to_canonical(node: fx.Node) -> fx.Node | None:
    """`aten.subtract(x, y)` → `aten.sub(x, y)`: the same kernel under its short name."""
    canonical = _ALIASES.get(node.target)
    if canonical is None:
        return None
    with node.graph.inserting_before(node):
        replacement = node.graph.call_function(canonical, node.args, node.kwargs)
    replacement.meta.update(node.meta)
    return replacement


# (counter, rewrite): a rewrite inserts the replacement of a node, or returns None to leave it.
_REWRITES: tuple[tuple[str, Callable[[fx.Node], fx.Node | None]], ...] = (
    ("canonicalize_alias", alias_to_canonical),
    ("canonicalize_einsum", einsum_to_matmul),
    ("canonicalize_where_fill", where_scalar_fill),
    ("canonicalize_softmax", manual_softmax),
    ("canonicalize_removed", _identity_input),
)


@dataclass(frozen=True)
class CanonicalizePass:
    name: str = "canonicalize"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        functionalized = functionalize(gm.graph)
        ctx.counters["canonicalize_functionalized"] += functionalized
        modified = functionalized > 0
        nodes = list(gm.graph.nodes)
        visited = set(nodes)
        for node in nodes:
            if node.op != "call_function":
                continue
            if is_op(node, aten._assert_tensor_metadata) and not node.users:
                # torch.export's dtype/shape checks before casts: facts the fake metadata already holds.
                gm.graph.erase_node(node)
                modified = True
                continue
            replacement = _rewrite(node, ctx)
            modified = modified or replacement is not None
            # A node a rewrite inserted is in no list taken before: its own rewrites run now (torch.multiply(x, 1.0)
            # becomes mul(x, 1.0), which is then x).
            while replacement is not None and replacement not in visited:
                visited.add(replacement)
                replacement = _rewrite(replacement, ctx)
        return PassResult(gm, modified)


def _rewrite(node: fx.Node, ctx: PassContext) -> fx.Node | None:
    """Replace `node` by the result of the first rewrite that fires on it; that result, or None when none fires."""
    for counter, rewrite in _REWRITES:
        replacement = rewrite(node)
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            node.graph.erase_node(node)
            ctx.counters[counter] += 1
            return replacement
    return None
