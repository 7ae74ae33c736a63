"""The norms pass: replace every RMSNorm/LayerNorm site by a `tilefuse::*norm` op carrying a NormSpec.

A norm whose input is a residual add (`h = a + b` that later code also reads) becomes `add_rms_norm` /
`add_layer_norm`, which returns (norm(h), h) so the residual stream no longer needs its own pass over memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..codegen.op_schema import NormArgs, norm_op
from ..codegen.reference import compute_dtype
from ..specs import NormSpec
from .base import Decline, FixableDecline, PassContext, PassResult
from .graph import aten, dtype_of, getitem, insert_call, replace_with, static_shape, tensor_val
from .match_common import cast_source, dtype_name, erase_dead, node_order, operand, strip_widening_casts
from .norm_match import NormKind, NormMatch, match_norm, norm_anchor_kind
from .norm_vector import VectorNorm, match_vector_norm, vector_norm_site
from .out_layout import keep_layout
from .scalars import ScalarArg


@dataclass(frozen=True)
class NormPass:
    """Recognize RMSNorm and LayerNorm (ATen ops and manual spellings) and rewrite them to tilefuse ops.

    Every candidate is recorded in `ctx` as fused or declined with a reason; residual adds are folded in when
    "residual" is enabled.
    """

    name: str = "norms"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        live = set(gm.graph.nodes)
        for node in [n for n in gm.graph.nodes if n.op == "call_function"]:
            anchor = _anchor(node) if node in live else None
            if anchor is None or not ctx.is_enabled(anchor.kind):
                continue
            replaced = _fuse_site(gm, anchor, ctx)
            if replaced is not None:
                modified = True
                live -= erase_dead(gm.graph, replaced)  # later sites' legality checks see only live users
        return PassResult(gm, modified)


@dataclass(frozen=True)
class _Anchor:
    """The node a norm candidate is matched from, its kind, and for a vector norm the division found with it."""

    node: fx.Node
    kind: NormKind
    vector: VectorNorm | None = None

    def match(self) -> NormMatch:
        return match_vector_norm(self.vector) if self.vector is not None else match_norm(self.node, self.kind)


def _anchor(node: fx.Node) -> _Anchor | None:
    """A norm op, 1/sqrt of a variance, or a vector norm divided into its own input (norm_vector.py)."""
    vector = vector_norm_site(node)
    if vector is not None:
        return _Anchor(node, vector.kind, vector)
    kind = norm_anchor_kind(node)
    return _Anchor(node, kind) if kind is not None else None


def _fuse_site(gm: fx.GraphModule, anchor: _Anchor, ctx: PassContext) -> set[fx.Node] | None:
    """Rewrite one candidate; returns the nodes it made redundant, or None when it declined."""
    kind = anchor.kind
    try:
        match = anchor.match()
    except Decline as decline:
        ctx.declined(kind, anchor.node, decline.reason, decline.spec)
        if isinstance(decline, FixableDecline):
            ctx.advise(decline.key, f"{kind} {anchor.node.name} not fused: {decline.reason}", decline.fix)
        return None
    if not match.outputs:  # a native_layer_norm whose normalized output is unused: nothing to replace
        return None
    new_node, spec, plan = _rewrite(gm.graph, match, ctx.is_enabled("residual"))
    ctx.fused(spec.norm, new_node, spec)
    return match.region | {plan.x} | {read for _, read in plan.residual_uses or ()}


# --------------------------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    x: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    residual: tuple[fx.Node, fx.Node] | None = None  # (a, b) of the fused add
    residual_uses: list[tuple[fx.Node, fx.Node]] | None = None  # (user, node it reads) to redirect to the sum
    eps: ScalarArg | None = None  # a node computing a run-time eps: the op must come after it too


def _out_dtype(*inputs: fx.Node | None) -> torch.dtype | None:
    dtypes = [d for d in (dtype_of(n) for n in inputs if n is not None) if d is not None]
    if not dtypes:
        return None
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _strip(node: fx.Node | None) -> fx.Node | None:
    return strip_widening_casts(node) if node is not None else None


def _choose_inputs(m: NormMatch) -> _Plan:
    """Skip upcasts of x/weight/bias (the op computes in fp32 anyway) unless that would narrow the output."""
    stripped = _Plan(strip_widening_casts(m.x), _strip(m.weight), _strip(m.bias), eps=m.eps_arg)
    if _out_dtype(stripped.x, stripped.weight, stripped.bias) == dtype_of(m.outputs[0]):
        return stripped
    return _Plan(m.x, m.weight, m.bias, eps=m.eps_arg)


def _insert_point(plan: _Plan, order: dict[fx.Node, int]) -> fx.Node:
    """The node right after the last input of the fused op: the earliest place it can go."""
    inputs = [plan.x, plan.weight, plan.bias, plan.eps, *(plan.residual or ())]
    last = max((n for n in inputs if isinstance(n, fx.Node)), key=order.__getitem__)
    return last.next


def _plan_residual(plan: _Plan, m: NormMatch, order: dict[fx.Node, int]) -> None:
    """Fold `x = a + b` into the op when the sum is also read elsewhere (the residual stream)."""
    add = plan.x
    if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs:
        return
    a, b = operand(add, 0), operand(add, 1)
    vals = [tensor_val(a), tensor_val(b), tensor_val(add)]
    # str(dim): symbolic sizes are unhashable; equal symbols print the same.
    layouts = {(tuple(str(d) for d in v.shape), v.dtype) for v in vals if v is not None}
    if any(v is None for v in vals) or len(layouts) != 1:
        return
    chain = [m.x]  # the add and the lossless casts from it to the norm's input: all hold the sum
    while chain[-1] is not add and (source := cast_source(chain[-1])) is not None:
        chain.append(source)
    uses = [(u, n) for n in chain for u in n.users if u not in m.region and u not in chain]
    plan.residual = (a, b)
    start = order[_insert_point(plan, order)] if uses else 0
    if not uses or any(order[u] < start for u, _ in uses):
        plan.residual = None  # no residual stream, or a reader sits before the op could be placed
        return
    plan.residual_uses = uses


# ---------------------------------------------------------------------------------------------- rewrite
def _rewrite(graph: fx.Graph, m: NormMatch, residual_enabled: bool) -> tuple[fx.Node, NormSpec, _Plan]:
    order = node_order(graph)
    plan = _choose_inputs(m)
    if residual_enabled:
        _plan_residual(plan, m, order)
    spec = _spec(m, plan)
    with graph.inserting_before(_insert_point(plan, order)):
        plan.weight = _feature_vector(graph, plan.weight, m.width)
        op = norm_op(spec.norm == "rmsnorm", spec.residual)
        x, residual = plan.residual or (plan.x, None)
        tensors = {"x": x, "residual": residual, "weight": plan.weight, "bias": plan.bias}
        new_node = insert_call(graph, op.overload, op.call_args(NormArgs.from_spec(spec, tensors, m.eps_arg)))
        normed = getitem(graph, new_node, 0) if plan.residual else new_node
        total = getitem(graph, new_node, 1) if plan.residual else None
        for user, old in plan.residual_uses or ():
            assert total is not None
            user.replace_input_with(old, _as_dtype(graph, keep_layout(graph, total, old), dtype_of(old)))
    new_node.meta["tilefuse_spec"] = spec
    for output in m.outputs:  # each with the strides it had, so code that views it keeps working
        replace_with(output, keep_layout(graph, normed, output))
    return new_node, spec, plan


def _feature_vector(graph: fx.Graph, weight: fx.Node | None, width: int) -> fx.Node | None:
    """A one-value gain (ScaleNorm) expanded to the `width` vector the op takes; its gradient sums back."""
    value = tensor_val(weight)
    if weight is None or value is None or tuple(value.shape) == (width,):
        return weight
    return insert_call(graph, aten.expand.default, (weight, [width]))


def _as_dtype(graph: fx.Graph, node: fx.Node, dtype: torch.dtype | None) -> fx.Node:
    if dtype is None or dtype_of(node) == dtype:
        return node
    return insert_call(graph, aten._to_copy.default, (node,), {"dtype": dtype})


def _spec(m: NormMatch, plan: _Plan) -> NormSpec:
    x_dtype = dtype_of(plan.x)
    return NormSpec(
        norm=m.kind,
        width=m.width,
        shape=static_shape(plan.x),
        dtype=dtype_name(x_dtype),
        eps=m.eps,
        has_weight=plan.weight is not None,
        has_bias=plan.bias is not None,
        weight_offset=m.weight_offset,
        residual=plan.residual is not None,
        compute_dtype=dtype_name(compute_dtype(x_dtype) if x_dtype is not None else None),
        out_dtype=dtype_name(_out_dtype(plan.x, plan.weight, plan.bias)),
        dynamic_scalars=m.dynamic_scalars,
        eps_mode=m.eps_mode,
        norm_scale=m.norm_scale,
    )
