"""Recognize rotary embeddings, `x·cos + rot(x)·sin`, in four spellings and describe each as a RopeMatch.

rot is rotate-half (`cat(-x2, x1)`, Llama/NeoX), rotate-every-two (`stack(-x_odd, x_even).flatten(-2)`,
GPT-J) or a complex multiply by `freqs_cis` (Meta Llama); or the rotation is written on two views of x with
per-pair tables, `cat(a·cos - b·sin, b·cos + a·sin)` (GPT-OSS, DeepSeek-V3; rope_split.py). Partial rotary
(`cat(rope(x[..., :r]), x[..., r:])`) becomes one site over the whole x. Matchers raise `Decline` with a reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..specs import RopeLayout
from .base import Decline
from .graph import (
    arg,
    aten,
    escaping_nodes,
    is_op,
    region_between,
    scalar_value,
    single_user,
    static_shape,
    tensor_val,
)
from .match_common import is_last_dim, node_order, op_name, operand, other_operand, same_value
from .rope_split import match_split_rotation, split_rotation_anchor

_MAX_INDEX = 2**63 - 1


@dataclass
class RopeMatch:
    """One RoPE site: the op's operands and the node whose uses it takes over."""

    x: fx.Node
    cos: fx.Node | None  # None for the complex spelling: built from `freqs` by the rewrite
    sin: fx.Node | None
    layout: RopeLayout
    rotary_dim: int
    output: fx.Node
    source: str
    freqs: fx.Node | None = None
    nodes: set[fx.Node] = field(default_factory=set)
    half_tables: bool = False  # cos/sin hold one angle per pair: doubled, cat(t, t), for the op
    deinterleave: bool = False  # the op rotates x de-interleaved (even features, then odd ones)


# ---------------------------------------------------------------------------------------- last-dim views
def _last_size(node: Any) -> int | None:
    shape = static_shape(node) if isinstance(node, fx.Node) else ()
    return shape[-1] if shape else None


def last_dim_view(node: Any) -> tuple[fx.Node, int, int, int] | None:
    """(base, start, stop, step) when `node` is base[..., start:stop:step] on the last axis.

    Slices, chunk/split pieces and `x.unflatten(-1, (-1, 2))[..., k]` pairs all reduce to this form.
    """
    if is_op(node, aten.slice):
        return _slice_view(node)
    if is_op(node, aten.alias) and _last_size(operand(node)) is not None:  # x[..., :d] traces as alias(x)
        return operand(node), 0, _last_size(operand(node)) or 0, 1
    is_piece = isinstance(node, fx.Node) and node.target is operator.getitem
    if is_piece and is_op(operand(node), aten.chunk, aten.split):
        return _chunk_view(operand(node), operand(node, 1))
    if is_piece and is_op(operand(node), aten.unbind):
        return _unbound_pair_view(operand(node), operand(node, 1))
    if is_op(node, aten.select) and is_op(operand(node), aten.unflatten):
        return _pair_view(node)
    return None


def view_nodes(node: fx.Node) -> set[fx.Node]:
    """The nodes of a `last_dim_view`: the view, plus the chunk/split/unflatten it reads from."""
    parent = operand(node)
    if is_op(parent, aten.unbind):
        return {node, parent, operand(parent)}
    return {node, parent} if is_op(parent, aten.chunk, aten.split, aten.unflatten) else {node}


def _slice_view(node: fx.Node) -> tuple[fx.Node, int, int, int] | None:
    base, size = operand(node), _last_size(operand(node))
    if size is None or not is_last_dim(base, arg(node, 1, "dim", 0)):
        return None
    start, stop, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    if not all(isinstance(v, int) or v is None for v in (start, stop, step)):
        return None
    start = 0 if start is None else (start + size if start < 0 else min(start, size))
    stop = size if stop is None or stop >= _MAX_INDEX else (stop + size if stop < 0 else min(stop, size))
    return base, start, stop, step


def _chunk_view(parent: fx.Node, index: int) -> tuple[fx.Node, int, int, int] | None:
    base, size, count = operand(parent), _last_size(operand(parent)), operand(parent, 1)
    if size is None or not is_last_dim(base, arg(parent, 2, "dim", 0)) or not isinstance(count, int):
        return None
    part = math.ceil(size / count) if is_op(parent, aten.chunk) else count  # chunk: a count; split: a size
    return base, index * part, min((index + 1) * part, size), 1


def _pair_view(node: fx.Node) -> tuple[fx.Node, int, int, int] | None:
    """x.unflatten(-1, (-1, 2))[..., k] is x[..., k::2]."""
    pairs, k = operand(node), arg(node, 2, "index")
    base, size = operand(pairs), _last_size(operand(pairs))
    if size is None or not is_last_dim(base, operand(pairs, 1)) or list(operand(pairs, 2))[-1] != 2:
        return None
    if not is_last_dim(pairs, arg(node, 1, "dim")) or k not in (0, 1):
        return None
    return base, k, size, 2


def _unbound_pair_view(unbind: fx.Node, k: Any) -> tuple[fx.Node, int, int, int] | None:
    """x.view(..., -1, 2).unbind(-1)[k] is x[..., k::2] (SAM's `rotate_pairwise`)."""
    pairs = operand(unbind)
    if not is_op(pairs, aten.view, aten.reshape, aten.unflatten, aten._unsafe_view) or k not in (0, 1):
        return None
    base, size = operand(pairs), _last_size(operand(pairs))
    if size is None or size % 2 or static_shape(pairs) != (*static_shape(base)[:-1], size // 2, 2):
        return None
    return (base, k, size, 2) if is_last_dim(pairs, arg(unbind, 1, "dim", 0)) else None


def _negated(node: Any) -> Any:
    """y for `-y` or `y * -1`, else None."""
    if is_op(node, aten.neg):
        return operand(node)
    factor = operand(node, 1) if is_op(node, aten.mul) else None
    if factor is not None and not isinstance(factor, fx.Node) and scalar_value(factor) == -1.0:
        return operand(node)
    return None


# ------------------------------------------------------------------------------------------------ anchors
def rope_anchor(node: fx.Node) -> bool:
    """A candidate site: a cat/stack of (-a, b) on the last axis, or a view_as_complex (complex spelling)."""
    if is_op(node, aten.view_as_complex) or split_rotation_anchor(node):
        return True
    if not is_op(node, aten.cat, aten.stack) or len(operand(node)) != 2:
        return False
    return _negated(operand(node)[0]) is not None


def match_rope(anchor: fx.Node) -> RopeMatch:
    """Describe the RoPE anchored at `anchor` (see `rope_anchor`); raises Decline when it cannot be fused."""
    if is_op(anchor, aten.view_as_complex):
        m = _match_complex(anchor)
    else:
        m = _match_split(anchor) if split_rotation_anchor(anchor) else _match_rotation(anchor)
    if not m.deinterleave:  # a partial site would de-interleave features it does not rotate
        _extend_partial(m)
    _check_region(m)
    return m


# ------------------------------------------------------------------------------------------- real forms
def _rotation(anchor: fx.Node) -> tuple[fx.Node, RopeLayout, fx.Node, set[fx.Node]]:
    """(x, layout, rotated value, nodes) of `cat(-x2, x1)` or `stack(-x_odd, x_even).flatten(-2)`."""
    neg, kept = operand(anchor)
    a, b = last_dim_view(_negated(neg)), last_dim_view(kept)
    if a is None or b is None or a[0] is not b[0]:
        raise Decline("rotation halves are not views of one tensor's last axis")
    x, size = a[0], _last_size(a[0])
    nodes = {anchor, neg} | view_nodes(kept) | view_nodes(_negated(neg))
    if is_op(anchor, aten.cat) and is_last_dim(anchor, arg(anchor, 1, "dim", 0)) and size is not None:
        if a[1:] == (size // 2, size, 1) and b[1:] == (0, size // 2, 1) and size % 2 == 0:
            return x, "rotate_half", anchor, nodes
        raise Decline("cat of (-a, b) is not rotate-half: expected (-x[..., d/2:], x[..., :d/2])")
    flat = single_user(anchor)
    is_pairs = size is not None and size % 2 == 0 and a[1:] == (1, size, 2) and b[1:] == (0, size, 2)
    if is_op(anchor, aten.stack) and _is_pair_flatten(anchor, flat) and flat is not None and is_pairs:
        return x, "interleaved", flat, nodes | {flat}
    raise Decline("stack of (-a, b) is not rotate-every-two: expected (-x[..., 1::2], x[..., ::2]) flattened")


def _is_pair_flatten(stack: fx.Node, flat: Any) -> bool:
    rank = len(static_shape(stack))
    if arg(stack, 1, "dim", 0) not in (-1, rank - 1):
        return False
    if is_op(flat, aten.flatten):
        start, end = arg(flat, 1, "start_dim", 0), arg(flat, 2, "end_dim", -1)
        return start in (-2, rank - 2) and end in (-1, rank - 1)
    shape = static_shape(stack)
    pairs = shape[-2] * 2 if len(shape) >= 2 and shape[-2] is not None else None
    return is_op(flat, aten.view, aten.reshape) and static_shape(flat) == (*shape[:-2], pairs)


def _match_rotation(anchor: fx.Node) -> RopeMatch:
    x, layout, rotated, nodes = _rotation(anchor)
    for sin_mul in (u for u in rotated.users if is_op(u, aten.mul)):
        for add in (u for u in sin_mul.users if is_op(u, aten.add) and "alpha" not in u.kwargs):
            cos_mul = other_operand(add, sin_mul)
            has_x = is_op(cos_mul, aten.mul) and any(same_value(a, x) for a in cos_mul.args)
            if has_x and cos_mul is not sin_mul:
                x_arg = operand(cos_mul) if same_value(operand(cos_mul), x) else operand(cos_mul, 1)
                cos, sin = other_operand(cos_mul, x_arg), other_operand(sin_mul, rotated)
                m = RopeMatch(x, cos, sin, layout, _last_size(x) or 0, add, layout)
                m.nodes = nodes | {sin_mul, add, cos_mul, x_arg}
                _check_tables(m, {"cos": cos, "sin": sin})
                return m
    raise Decline("rotated value does not feed x*cos + rot(x)*sin")


def _check_tables(m: RopeMatch, tables: dict[str, Any]) -> None:
    """cos/sin (or freqs) must broadcast against x without growing it, with one value per feature (pair)."""
    x_val = tensor_val(m.x)
    for name, table in tables.items():
        t = tensor_val(table)
        if x_val is None or t is None:
            raise Decline(f"{name} is not a tensor")
        width = x_val.shape[-1] // 2 if m.freqs is not None or m.half_tables else x_val.shape[-1]
        if t.shape[-1] != width:
            raise Decline(f"{name} has last dim {t.shape[-1]}; expected last dim {width}")
        target = (*x_val.shape[:-1], width)
        try:  # broadcasting must not grow x: the op's output has x's shape
            grown = tuple(torch.broadcast_shapes(t.shape, target)) != target
        except RuntimeError:
            grown = True
        if grown:
            raise Decline(f"{name} of shape {list(t.shape)} does not broadcast to x of {list(x_val.shape)}")


def _match_split(anchor: fx.Node) -> RopeMatch:
    """`cat(a·cos - b·sin, b·cos + a·sin)`: rotate-half RoPE of x (halves) or of x de-interleaved (pairs)."""
    _, _, cos, sin, x, pairing, nodes = match_split_rotation(anchor)
    source = "split_halves" if pairing == "halves" else "split_pairs"
    m = RopeMatch(x, cos, sin, "rotate_half", _last_size(x) or 0, anchor, source, half_tables=True)
    m.deinterleave, m.nodes = pairing == "pairs", nodes
    _check_tables(m, {"cos": cos, "sin": sin})
    return m


# ------------------------------------------------------------------------------------------ complex form
def _match_complex(vac: fx.Node) -> RopeMatch:
    """view_as_real(view_as_complex(x.reshape(..., -1, 2)) * freqs).flatten(-2): interleaved pairs."""
    pairs = operand(vac)
    x = operand(pairs) if is_op(pairs, aten.view, aten.reshape, aten.unflatten) else None
    size = _last_size(x)
    if x is None or size is None or static_shape(pairs) != (*static_shape(x)[:-1], size // 2, 2):
        raise Decline("view_as_complex input is not x split into (real, imag) pairs")
    mul = single_user(vac)
    if not is_op(mul, aten.mul) or mul is None:
        raise Decline("complex value is not multiplied by freqs_cis")
    freqs = other_operand(mul, vac)
    real = single_user(mul)
    flat = single_user(real) if real is not None and is_op(real, aten.view_as_real) else None
    if real is None or flat is None or not _is_unpair(flat, x):
        raise Decline("complex product is not flattened back to x's shape")
    freqs_val = tensor_val(freqs)
    if freqs_val is None or not freqs_val.dtype.is_complex:
        raise Decline("complex multiplier is not a complex tensor")
    m = RopeMatch(x, None, None, "interleaved", size, flat, "complex", freqs=freqs)
    m.nodes = {pairs, vac, mul, real, flat}
    _check_tables(m, {"freqs_cis": freqs})
    return m


def _is_unpair(flat: fx.Node, x: fx.Node) -> bool:
    return is_op(flat, aten.flatten, aten.view, aten.reshape) and static_shape(flat) == static_shape(x)


# ---------------------------------------------------------------------------------------- partial rotary
def _extend_partial(m: RopeMatch) -> None:
    """cat([rope(x[..., :r]), x[..., r:]], -1) is one rope over x with rotary_dim r."""
    view = last_dim_view(m.x)
    cat = single_user(m.output)
    if view is None or view[1:3] != (0, m.rotary_dim) or view[3] != 1 or cat is None:
        return
    base, size = view[0], _last_size(view[0])
    parts = operand(cat)
    if not is_op(cat, aten.cat) or len(parts) != 2 or parts[0] is not m.output:
        return
    rest = last_dim_view(parts[1])
    if size is None or rest != (base, m.rotary_dim, size, 1) or not is_last_dim(cat, arg(cat, 1, "dim", 0)):
        return
    m.nodes |= {cat} | view_nodes(m.x) | view_nodes(parts[1])
    m.x, m.output = base, cat


def _check_region(m: RopeMatch) -> None:
    """Everything between x and the output must belong to the pattern and be read only inside it."""
    region = region_between(m.output.graph, [m.x], m.output)
    order = node_order(m.output.graph)
    extra = sorted(region - m.nodes, key=order.__getitem__)
    if extra:
        raise Decline(f"{op_name(extra[0])} between x and the rope output is not part of the rotation")
    escaping = sorted(escaping_nodes(region, m.output), key=order.__getitem__)
    if escaping:
        raise Decline(f"intermediate {op_name(escaping[0])} is used outside the rope")
