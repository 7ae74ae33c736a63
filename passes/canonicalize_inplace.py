"""Functionalize in-place ops on intermediates: `x.op_(...)` becomes `op(...)`, and what read x afterwards reads
the functional result instead.

Only when that is exact: x owns its storage (a fresh intermediate, not a placeholder, constant, view or alias),
no alias of x made before the mutation is used after it, and the functional result has x's shape, dtype and
strides. Anything else keeps its mutation, and recognizers decline around it as before.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph import aliases_of, insert_equivalent, returns_alias

OpOverload = torch._ops.OpOverload

# In-place ops that swap or resize a tensor's storage rather than compute its values.
_KEEP_IN_PLACE = frozenset({"set_", "resize_", "resize_as_"})
_DUNDER_FUNCTIONAL = {"__iand__": "__and__", "__ior__": "__or__", "__ixor__": "__xor__"}


def functional_variant(target: object) -> OpOverload | None:
    """`aten.div.Tensor` for `aten.div_.Tensor`: the out-of-place overload with the same arguments, or None."""
    if not isinstance(target, OpOverload) or not _mutates_only_self(target):
        return None
    name = target._schema.name.split("::")[-1]
    if name in _KEEP_IN_PLACE or target.namespace != "aten" or torch.Tag.nondeterministic_seeded in target.tags:
        return None  # random fills stay: that their functional twins draw the same numbers is not proven
    base = _DUNDER_FUNCTIONAL.get(name, name[:-1])
    overload = getattr(getattr(torch.ops.aten, base, None), target._overloadname, None)
    if not isinstance(overload, OpOverload) or overload._schema.is_mutable:
        return None
    return overload if _signature(overload) == _signature(target) else None


def _mutates_only_self(target: OpOverload) -> bool:
    """`op_(Tensor(a!) self, ...) -> Tensor(a!)`: writes its first argument only and returns it."""
    schema = target._schema
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    returns = schema.returns
    return (
        bool(schema.arguments)
        and written == [schema.arguments[0]]
        and len(returns) == 1
        and returns[0].alias_info is not None
        and returns[0].alias_info.is_write
    )


def _signature(target: OpOverload) -> list[tuple[str, str, bool]]:
    return [(a.name, str(a.type), a.kwarg_only) for a in target._schema.arguments]


def owns_storage(node: object) -> bool:
    """True for an intermediate made by an op that returns a new tensor (not an input, constant, view or alias)."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and isinstance(node.target, OpOverload)
        and not returns_alias(node)
    )


def alias_read_after(tensor: fx.Node, mutation: fx.Node, order: dict[fx.Node, float]) -> bool:
    """True when an alias of `tensor` made before `mutation` (a view, say) is used after it: that alias would
    see the mutation, which replacing `tensor` by a new value cannot reproduce."""
    at = order[mutation]
    for alias in aliases_of(tensor) - {tensor, mutation}:
        if order[alias] < at and any(order[user] > at for user in alias.users):
            return True
    return False


def functionalize_one(node: fx.Node, order: dict[fx.Node, float]) -> fx.Node | None:
    """Rewrite the in-place call `node` when that is exact; returns the functional node, or None (left as is)."""
    functional = functional_variant(node.target)
    tensor = node.args[0] if node.args else None
    if functional is None or not isinstance(tensor, fx.Node) or not owns_storage(tensor):
        return None
    if alias_read_after(tensor, node, order):
        return None
    replacement = insert_equivalent(node, functional, node.args, dict(node.kwargs))
    if replacement is None:
        return None
    order[replacement] = order[node]
    node.replace_all_uses_with(replacement)
    for user in list(tensor.users):
        if user is not node and order[user] > order[node]:
            user.replace_input_with(tensor, replacement)
    node.graph.erase_node(node)
    return replacement


def functionalize(graph: fx.Graph) -> int:
    """Functionalize every in-place call that is safe to rewrite (in graph order); returns how many."""
    order: dict[fx.Node, float] = {n: float(i) for i, n in enumerate(graph.nodes)}
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and functional_variant(node.target) is not None:
            count += functionalize_one(node, order) is not None
    return count
