"""Absorb RoPE into attention: the `tilefuse::rope` ops producing Q and K become the attention op's cos/sin.

The rope may feed the attention directly or through a head permute that keeps the feature axis last (GPT-J
rotates [B, N, H, D] tensors, then permutes them to [B, H, N, D]). RoPE is elementwise over the leading axes, so
permute(rope(x, cos, sin)) = rope(permute(x), permute(cos), permute(sin)): the op then reads the permuted
pre-rope x and cos/sin permuted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch.fx as fx

from ..codegen.op_schema import ROPE
from ..specs import RopeSpec, rope_layout_name
from .attention_match import AttentionMatch
from .base import PassContext
from .graph import aten, insert_call, is_op, static_shape
from .positions import same_size, shape_of

HEAD_AXIS = 1  # of the [B, H, N, D] tensors the attention op reads


@dataclass(frozen=True)
class _RopeOperand:
    """A rope op and the permute (None: none) between it and the attention operand `operand`."""

    rope: fx.Node
    perm: tuple[int, ...] | None
    operand: fx.Node


def absorb_rope(graph: fx.Graph, match: AttentionMatch, region: set[fx.Node], ctx: PassContext) -> RopeSpec | None:
    """Fold the rope ops on Q and K into the site when they share cos/sin and the same permute (or none), and
    nothing else reads them; the nodes this needs are inserted at the graph's insertion point."""
    if match.three_d:
        return None
    q, k = _rope_operand(match.q), _rope_operand(match.k)
    if q is None or k is None or q.perm != k.perm or _rotation(q.rope) != _rotation(k.rope):
        return None
    if not all(_read_only_by_site(o, region, match.output) for o in (q, k)):
        return None
    tables: tuple[Any, Any] = (_rope_args(q.rope)["cos"], _rope_args(q.rope)["sin"])
    if q.perm is not None and not all(_broadcasts_over_heads(t, q.perm) for t in tables):
        return None
    if not all(_expands_to(t, q.perm, o) for t in tables for o in (match.q, match.k)):
        return None  # e.g. per-head tables with fewer K heads (GQA): the rope ops stay on their own
    match.q, match.k = _pre_rope(graph, q), _pre_rope(graph, k)
    match.rope_cos, match.rope_sin = (_permuted_table(graph, t, q.perm) for t in tables)
    for site in ctx.sites:
        if site.kind == "rope" and site.node in (q.rope.name, k.rope.name):
            site.detail["fused_into"] = match.anchor.name
    return _rope_spec(q, match.q)


def _rope_operand(node: Any) -> _RopeOperand | None:
    rope = ROPE.overload
    if not isinstance(node, fx.Node):
        return None
    if node.target is rope:
        return _RopeOperand(node, None, node)
    perm = _permutation(node)
    source = node.args[0] if perm is not None else None
    if perm is None or perm[-1] != len(perm) - 1 or not isinstance(source, fx.Node) or source.target is not rope:
        return None  # a permute that moves the feature axis would pair different features
    return _RopeOperand(source, perm, node)


def _permutation(node: fx.Node) -> tuple[int, ...] | None:
    shape = shape_of(node)
    if shape is None:
        return None
    rank = len(shape)
    if is_op(node, aten.permute):
        dims: Any = node.args[1]
        return tuple(d % rank for d in dims)
    if is_op(node, aten.transpose):
        swapped: Any = node.args[1:3]
        a, b = (int(d) % rank for d in swapped)
        perm = list(range(rank))
        perm[a], perm[b] = b, a
        return tuple(perm)
    return None


def _read_only_by_site(operand: _RopeOperand, region: set[fx.Node], output: fx.Node) -> bool:
    site_users = all(u in region or u is output for u in operand.operand.users)
    return site_users and (operand.perm is None or set(operand.rope.users) == {operand.operand})


def _broadcasts_over_heads(table: Any, perm: tuple[int, ...]) -> bool:
    """cos/sin, permuted like x, have size 1 along the head axis (one rotation per position, not per head)."""
    shape = shape_of(table)
    if shape is None or len(shape) > len(perm) or len(perm) <= HEAD_AXIS:
        return False
    padded = (1,) * (len(perm) - len(shape)) + shape
    return same_size(padded[perm[HEAD_AXIS]], 1)


def _expands_to(table: Any, perm: tuple[int, ...] | None, operand: Any) -> bool:
    """cos/sin, permuted like x, broadcast to the attention operand's leading dims (the op expands them)."""
    shape, target = shape_of(table), shape_of(operand)
    if shape is None or target is None or len(shape) > len(target):
        return False
    padded = (1,) * (len(target) - len(shape)) + tuple(shape)
    if perm is not None:
        padded = tuple(padded[p] for p in perm)
    return all(same_size(d, 1) or same_size(d, t) for d, t in zip(padded[:-1], target[:-1], strict=True))


def _pre_rope(graph: fx.Graph, operand: _RopeOperand) -> fx.Node:
    x: fx.Node = _rope_args(operand.rope)["x"]
    return x if operand.perm is None else insert_call(graph, aten.permute.default, (x, list(operand.perm)))


def _permuted_table(graph: fx.Graph, table: fx.Node, perm: tuple[int, ...] | None) -> fx.Node:
    if perm is None:
        return table
    for _ in range(len(perm) - len(shape_of(table) or ())):
        table = insert_call(graph, aten.unsqueeze.default, (table, 0))
    return insert_call(graph, aten.permute.default, (table, list(perm)))


def _rope_spec(operand: _RopeOperand, x: fx.Node) -> RopeSpec:
    spec = operand.rope.meta.get("tilefuse_spec")
    if isinstance(spec, RopeSpec):
        return spec if operand.perm is None else replace(spec, shape=static_shape(x))
    args = _rope_args(operand.rope)
    layout = rope_layout_name(int(args["layout"]))
    return RopeSpec(layout, int(args["rotary_dim"]), static_shape(x)[-1] or 0, shape=static_shape(x))


def _rope_args(rope: fx.Node) -> dict[str, Any]:
    """A tilefuse::rope node's arguments by name."""
    return ROPE.bind(rope.args, rope.kwargs)


def _rotation(rope: fx.Node) -> dict[str, Any]:
    """What a rope node does to its x: every argument but x (tables, layout, rotary dim, output layout)."""
    return {name: value for name, value in _rope_args(rope).items() if name != "x"}
