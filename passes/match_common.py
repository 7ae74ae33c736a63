"""Small pattern helpers the norm and RoPE recognizers share: casts, structural equality, last-dim checks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from .base import Decline
from .graph import aten, dtype_of, is_op, ndim, tensor_val

# Ops that only change the dtype of their first argument (shape, device and values otherwise kept).
_CAST_OPS = (aten.to, aten._to_copy, aten.type_as)


def cast_source(node: Any) -> fx.Node | None:
    """The input of a dtype-only cast (`to`, `_to_copy`, `type_as`), or None when `node` is not one."""
    if not is_op(node, *_CAST_OPS) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, out = tensor_val(node.args[0]), tensor_val(node)
    if src is None or out is None or src.shape != out.shape or src.device != out.device:
        return None
    return node.args[0]


def widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """True when casting `src` to `dst` loses nothing (same dtype, or a wider float)."""
    if src == dst:
        return True
    return src.is_floating_point and dst.is_floating_point and torch.promote_types(src, dst) == dst


def strip_widening_casts(node: fx.Node) -> fx.Node:
    """Walk up through casts that lose nothing; the kernels upcast internally, so these carry no meaning."""
    while True:
        src = cast_source(node)
        src_dtype, dst_dtype = dtype_of(src), dtype_of(node)
        if src is None or src_dtype is None or dst_dtype is None or not widens(src_dtype, dst_dtype):
            return node
        node = src


def same_value(a: Any, b: Any, depth: int = 4) -> bool:
    """Structural equality: the same node, or the same pure op applied to equal arguments (CSE-style)."""
    if a is b:
        return True
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and a == b
    if depth == 0 or a.op != "call_function" or b.op != "call_function" or a.target != b.target:
        return False
    if torch.Tag.nondeterministic_seeded in getattr(a.target, "tags", ()):
        return False  # two dropout/rand calls with equal arguments still differ
    if len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    pairs = [*zip(a.args, b.args, strict=True), *((a.kwargs[k], b.kwargs[k]) for k in a.kwargs)]
    return all(_same_arg(x, y, depth - 1) for x, y in pairs)


def _same_arg(a: Any, b: Any, depth: int) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_arg(x, y, depth) for x, y in zip(a, b, strict=True))
    return same_value(a, b, depth)


def is_last_dim(node: fx.Node, dim: Any) -> bool:
    """True when `dim` names the last axis of `node`'s value (as -1 or as ndim - 1)."""
    rank = ndim(node)
    return isinstance(dim, int) and rank > 0 and dim in (-1, rank - 1)


def fixed_size(size: Any, what: str) -> int:
    """A size a kernel needs fixed (head dim, head count, norm width) as an int. A symbolic size is specialized:
    converting it adds a guard, so Dynamo recompiles when it changes instead of the site being declined."""
    if isinstance(size, int):
        return size
    try:
        return int(size)
    except Exception as err:  # an unbacked (data-dependent) size has no value to specialize to
        raise Decline(f"{what} {size} is data-dependent: {type(err).__name__}") from err


def dtype_name(dtype: torch.dtype | None) -> str:
    """'float32' for torch.float32: the spelling Specs use."""
    return str(dtype).removeprefix("torch.") if dtype is not None else "unknown"


def operand(node: fx.Node, index: int = 0) -> Any:
    """node.args[index], typed loosely: matchers check what they get."""
    return node.args[index]


def other_operand(node: fx.Node, known: fx.Node) -> Any:
    """The argument of a binary op that is not `known` (the first one when both are)."""
    a, b = node.args[0], node.args[1]
    return b if a is known else a


def erase_dead(graph: fx.Graph, nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Erase the nodes of a replaced pattern that nothing reads any more; returns what was erased.

    A local stand-in for `eliminate_dead_code` after each site (which is O(graph) and dominated large models),
    so later sites' legality checks see only live users. Only pure call_function nodes are touched.
    """
    pending = {n for n in nodes if n.op == "call_function" and not n.is_impure()}
    erased: set[fx.Node] = set()
    while dead := {n for n in pending if not n.users}:
        for node in dead:
            graph.erase_node(node)
        erased |= dead
        pending -= dead
    return erased


def node_order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def op_name(node: fx.Node) -> str:
    """'rsqrt' for a node calling aten.rsqrt.default: the short name decline reasons use."""
    packet = getattr(node.target, "overloadpacket", None)
    return str(getattr(packet, "__name__", node.name))
