"""Additive masks read by the values they hold: a float mask whose every element is 0 or a fill that masks a score
out (masks.absorbs_scores) is a keep-mask (kept where 0), whatever ops build it.

Two readings: a mask computed from constants alone has one value, computed at compile time (litgpt's sliding
window, torchtune Gemma2's mask); a mask read from data may still hold only a few values, followed through casts,
views, repeats, `where` and arithmetic with numbers (diffusers' `(1 - keep.to(dtype)) * -10000.0`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from .graph import aten, constant_fill, is_op, scalar_operand, stored, tensor_val
from .positions import CASTS, SHAPE_VIEWS, constant_value, written_later

MAX_DEPTH = 12  # ops followed from the mask towards its sources
MAX_CONSTANT_VALUES = 16  # a constant mask with more distinct values is no keep-mask worth reading

_VALUE_PRESERVING = (*CASTS, *SHAPE_VIEWS, aten.unsqueeze, aten.expand, aten.repeat, aten.repeat_interleave,
                     aten.slice, aten.permute, aten.transpose)  # fmt: skip
_ARITHMETIC: dict[Any, Callable[[float, float], float]] = {
    aten.add: operator.add,
    aten.sub: operator.sub,
    aten.rsub: lambda a, b: b - a,
    aten.mul: operator.mul,
    aten.div: operator.truediv,
}


def only_keep_values(node: fx.Node, is_fill: Callable[[float], bool]) -> bool:
    """Whether the float tensor `node` holds only 0 (kept) and values `is_fill` accepts (masked out), and 0
    somewhere it can (a constant's value may be all masked)."""
    val = tensor_val(node)
    if val is None or not val.is_floating_point():
        return False
    value = constant_value(node)
    if value is not None:
        distinct = torch.unique(value)
        return distinct.numel() <= MAX_CONSTANT_VALUES and all(v == 0 or is_fill(v) for v in distinct.tolist())
    values = value_set(node, MAX_DEPTH)
    return values is not None and 0.0 in values and all(v == 0 or is_fill(v) for v in values)


def value_set(node: Any, depth: int) -> frozenset[float] | None:
    """Every value `node` can hold (a bool tensor: 0 and 1), through casts, views, repeats, where and arithmetic
    with a number; None when not known, or when an op outside its computation writes it."""
    fill = constant_fill(node)
    if fill is not None:
        return frozenset({fill})
    val = tensor_val(node)
    if not isinstance(node, fx.Node) or val is None or depth == 0 or written_later(node):
        return None
    if val.dtype == torch.bool:
        return frozenset({0.0, 1.0})
    values: frozenset[float] | None = None
    if is_op(node, *_VALUE_PRESERVING):
        values = value_set(node.args[0], depth - 1)
    elif is_op(node, aten.where) and len(node.args) == 3:
        a, b = value_set(node.args[1], depth - 1), value_set(node.args[2], depth - 1)
        values = a | b if a is not None and b is not None else None
    elif is_op(node, aten.neg):
        inner = value_set(node.args[0], depth - 1)
        values = frozenset(-v for v in inner) if inner is not None else None
    elif is_op(node, *_ARITHMETIC) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
        values = _arithmetic_values(node, depth)
    return _stored_set(values, val.dtype)


def _arithmetic_values(node: fx.Node, depth: int) -> frozenset[float] | None:
    """x <op> number, or number <op> x for the commutative ops; the number must not widen x's shape or dtype."""
    fn = next(f for packet, f in _ARITHMETIC.items() if is_op(node, packet))
    x, other = node.args
    number = scalar_operand(other, x)
    inner = value_set(x, depth - 1) if number is not None else None
    if inner is None and is_op(node, aten.add, aten.mul):
        number, inner = scalar_operand(x, other), value_set(other, depth - 1)
    if inner is None or number is None:
        return None
    try:
        return frozenset(fn(v, number) for v in inner)
    except (ZeroDivisionError, OverflowError):
        return None


def _stored_set(values: frozenset[float] | None, dtype: torch.dtype) -> frozenset[float] | None:
    """The values as a tensor of `dtype` stores them (float32 rounds; -1e39 becomes -inf); None when one is not
    known (graph.stored)."""
    if values is None:
        return None
    out = [stored(v, dtype) for v in values]
    return frozenset(v for v in out if v is not None) if None not in out else None
