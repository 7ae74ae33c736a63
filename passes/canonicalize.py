"""Canonicalize: remove ops that cannot change a value, so recognizers see fewer spellings.

Only exact identities are removed (casts to the same dtype, inactive dropout, multiplication by one in a float
dtype); everything that could change NaN/Inf/-0 behaviour, strides seen by a later view, or aliasing stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .base import PassContext, PassResult
from .graph import arg, aten, dtype_of, is_op, scalar_value


def _identity_input(node: fx.Node) -> fx.Node | None:
    """The input `node` passes through unchanged, or None."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or dtype_of(source) is None or dtype_of(source) != dtype_of(node):
        return None
    if is_op(node, aten.to) and node.target in (aten.to.dtype,) and len(node.args) == 2 and not node.kwargs:
        return source
    if is_op(node, aten.dropout) and (not arg(node, 2, "train", False) or float(arg(node, 1, "p", 0.0)) == 0.0):
        return source
    if is_op(node, aten.mul) and scalar_value(node.args[1]) == 1.0 and not isinstance(node.args[1], fx.Node):
        return source if dtype_of(source) is not None and dtype_of(source).is_floating_point else None  # type: ignore[union-attr]
    return None


@dataclass(frozen=True)
class CanonicalizePass:
    name: str = "canonicalize"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if is_op(node, aten._assert_tensor_metadata) and not node.users:
                # torch.export's dtype/shape checks before casts: facts the fake metadata already holds.
                gm.graph.erase_node(node)
                modified = True
                continue
            source = _identity_input(node)
            if source is not None:
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                ctx.counters["canonicalize_removed"] += 1
                modified = True
        modified = gm.graph.eliminate_dead_code() or modified
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
