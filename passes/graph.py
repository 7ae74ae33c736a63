"""Graph helpers shared by the recognizers: op tests, metadata access, constants, regions and node insertion."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

aten = torch.ops.aten


def is_op(node: Any, *packets: Any) -> bool:
    """True when `node` calls one of `packets` (an OpOverloadPacket like aten.add, or an exact overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return any(target is p or packet is p for p in packets)


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def tensor_val(node: Any) -> torch.Tensor | None:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def static_dim(d: Any) -> int | None:
    """An int for a static size, None for a symbolic one."""
    if isinstance(d, int):
        return d
    try:
        return int(d) if not isinstance(d, torch.SymInt) or d.node.is_constant() else None
    except Exception:
        return None


def static_shape(node: fx.Node) -> tuple[int | None, ...]:
    t = tensor_val(node)
    return tuple(static_dim(d) for d in t.shape) if t is not None else ()


def ndim(node: Any) -> int:
    t = tensor_val(node)
    return t.dim() if t is not None else -1


def dtype_of(node: Any) -> torch.dtype | None:
    t = tensor_val(node)
    return t.dtype if t is not None else None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def scalar_value(x: Any) -> float | None:
    """The Python number `x` stands for: a literal, or a node building a 0-d constant (full, scalar_tensor)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if is_op(x, aten.full) and len(x.args[0]) == 0:
        return scalar_value(x.args[1])
    if is_op(x, aten.zeros, aten.ones) and len(x.args[0]) == 0:
        return 0.0 if is_op(x, aten.zeros) else 1.0
    if is_op(x, aten.scalar_tensor):
        return scalar_value(x.args[0])
    if is_op(x, aten.to, aten._to_copy, aten.clone, aten.detach, aten.lift_fresh_copy):
        return scalar_value(x.args[0])
    if is_op(x, aten.sqrt):
        inner = scalar_value(x.args[0])
        return math.sqrt(inner) if inner is not None and inner >= 0 else None
    return None


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def region_between(graph: fx.Graph, inputs: Iterable[fx.Node], output: fx.Node) -> set[fx.Node]:
    """Nodes on some path from one of `inputs` to `output`, inputs excluded, output included.

    Only the ancestors of `output` up to `inputs` are visited, so the cost is local to the site.
    """
    stop = set(inputs)
    local: nx.DiGraph = nx.DiGraph()
    stack, seen = [output], {output}
    while stack:
        node = stack.pop()
        local.add_node(node)
        if node in stop:
            continue
        for parent in node.all_input_nodes:
            local.add_edge(parent, node)
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    region: set[fx.Node] = set()
    for node in stop & set(local.nodes):
        region |= nx.descendants(local, node)
    return region - stop


def escaping_nodes(region: set[fx.Node], output: fx.Node) -> list[fx.Node]:
    """Region nodes other than `output` whose value is used outside the region."""
    return [n for n in region if n is not output and any(u not in region for u in n.users)]


def fake_mode_of(graph: fx.Graph) -> FakeTensorMode | None:
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def insert_call(
    graph: fx.Graph, target: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any] | None = None
) -> fx.Node:
    """Insert `target(*args)` at the current insertion point and fill its `val` metadata by fake propagation."""
    node = graph.call_function(target, tuple(args), kwargs or {})
    fake_mode = fake_mode_of(graph)
    fake_args = fx.node.map_arg(node.args, lambda n: n.meta.get("val"))
    fake_kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta.get("val"))
    if fake_mode is not None:
        with fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def getitem(graph: fx.Graph, node: fx.Node, index: int) -> fx.Node:
    import operator

    item = graph.call_function(operator.getitem, (node, index))
    item.meta["val"] = node.meta["val"][index] if "val" in node.meta else None
    return item


def replace_with(old: fx.Node, new: fx.Node) -> None:
    """Replace all uses of `old` by `new`, inserting a dtype cast when the dtypes differ."""
    old_dtype, new_dtype = dtype_of(old), dtype_of(new)
    if old_dtype is not None and new_dtype is not None and old_dtype != new_dtype:
        with old.graph.inserting_after(new):
            new = insert_call(old.graph, aten._to_copy.default, (new,), {"dtype": old_dtype})
    old.replace_all_uses_with(new)
