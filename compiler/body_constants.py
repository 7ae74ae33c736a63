"""Operands a body's caller computes from constants alone (HF's causal mask, built once before the decoder layers and
passed into every checkpointed layer) are computed inside the body instead, before the passes run there: the passes
then prove what they prove in an unwrapped graph (causal from how the mask is built) rather than seeing an opaque
input. The copy computes the same value, so the body's meaning is unchanged; when the passes absorb it, nothing of it
is left, and when they do not, the body recomputes a small constant computation instead of receiving it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .hop_bodies import hop_name

MAX_COPIED_NODES = 64  # a mask construction is a few dozen ops; anything bigger is not worth recomputing


def _operands(call: fx.Node) -> tuple[object, ...]:
    """What a call passes to its body's placeholders: invoke_subgraph has an identifier before them."""
    skip = 2 if hop_name(call) == "invoke_subgraph" else 1
    return tuple(call.args[skip:])


def _copyable(node: fx.Node) -> bool:
    """A pure, deterministic ATen call (or a getitem of one)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    target = node.target
    return (
        isinstance(target, torch._ops.OpOverload)
        and not target._schema.is_mutable
        and torch.Tag.nondeterministic_seeded not in target.tags
    )


def _constant_cone(operand: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node] | None:
    """The nodes `operand` is computed from, in graph order, when they read no input, attribute or state."""
    cone: set[fx.Node] = set()
    stack = [operand]
    while stack:
        node = stack.pop()
        if node in cone:
            continue
        if not _copyable(node) or len(cone) >= MAX_COPIED_NODES:
            return None
        cone.add(node)
        stack.extend(node.all_input_nodes)
    return sorted(cone, key=order.__getitem__)


def inline_constant_operands(calls: list[fx.Node], body: fx.GraphModule) -> list[fx.Node]:
    """Compute inside `body` each operand that all its `calls` pass as the same constant computation; returns the
    copied nodes (for `drop_unused_copies` after the passes)."""
    placeholders = list(body.graph.find_nodes(op="placeholder"))
    operand_lists = [_operands(call) for call in calls]
    if not calls or any(len(ops) != len(placeholders) for ops in operand_lists):
        return []
    order = {node: i for i, node in enumerate(calls[0].graph.nodes)}
    anchor = next(n for n in body.graph.nodes if n.op != "placeholder")
    copies: list[fx.Node] = []
    for i, placeholder in enumerate(placeholders):
        operand = operand_lists[0][i]
        if not isinstance(operand, fx.Node) or not placeholder.users:
            continue
        cone = _constant_cone(operand, order) if all(ops[i] is operand for ops in operand_lists) else None
        if cone is None:
            continue
        env: dict[fx.Node, fx.Node] = {}
        with body.graph.inserting_before(anchor):
            for node in cone:
                env[node] = body.graph.node_copy(node, env.__getitem__)
        placeholder.replace_all_uses_with(env[operand])
        copies.extend(env.values())
    return copies


def drop_unused_copies(body: fx.GraphModule, copies: list[fx.Node]) -> None:
    """Erase the copies the passes left without users (absorbed into a fused op's flags), last first."""
    alive = set(body.graph.nodes)
    for node in reversed(copies):
        if node in alive and not node.users:
            body.graph.erase_node(node)
    body.recompile()
