"""Recognize RMSNorm and LayerNorm, as ATen ops or spelled out, and describe each site as a NormMatch.

Manual spellings are anchored on the semantic core, the inverse square root of a last-dim variance
(`rsqrt(mean(x²) + eps)`, `1/sqrt(var(x) + eps)`, ...), and then walk out to the input and the affine tail.
Matchers raise `Decline` with a reason; the pass turns it into a declined site.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx

from ..codegen.reference import compute_dtype
from ..specs import EpsMode
from .base import Decline
from .graph import (
    arg,
    aten,
    dtype_of,
    escaping_nodes,
    is_op,
    region_between,
    scalar_value,
    single_user,
    static_dim,
    tensor_val,
)
from .match_common import (
    cast_source,
    fixed_size,
    is_last_dim,
    node_order,
    op_name,
    operand,
    other_operand,
    same_value,
    strip_widening_casts,
)
from .scalars import ScalarArg, scalar_arg, scalar_hint, tensor_scalar_decline

NormKind = Literal["rmsnorm", "layernorm"]


@dataclass
class NormMatch:
    """One norm site: what to feed the fused op and which nodes it replaces."""

    kind: NormKind
    x: fx.Node  # the value statistics are taken over, as the graph has it
    outputs: list[fx.Node]  # nodes whose uses the fused op takes over
    eps_arg: ScalarArg  # a constant, or the node computing eps at run time (dynamic=True)
    width: int
    weight: fx.Node | None = None
    bias: fx.Node | None = None
    weight_offset: float = 0.0
    region: set[fx.Node] = field(default_factory=set)  # every node the fused op makes redundant
    eps_mode: EpsMode = "mean_square"  # where eps goes (NormSpec.eps_mode)
    norm_scale: float = 1.0  # the statistic eps meets is norm_scale · RMS(x)

    @property
    def eps(self) -> float:
        """eps as the Spec records it: the value, or its value at capture when it is a run-time scalar."""
        return scalar_hint(self.eps_arg)

    @property
    def dynamic_scalars(self) -> tuple[str, ...]:
        return ("eps",) if isinstance(self.eps_arg, fx.Node) else ()


# ------------------------------------------------------------------------------------------------ anchors
def norm_anchor_kind(node: fx.Node) -> NormKind | None:
    """The norm kind when `node` anchors a candidate site (a norm op, or 1/sqrt of a variance), else None."""
    if is_op(node, aten.rms_norm):
        return "rmsnorm"
    if is_op(node, aten.layer_norm, aten.native_layer_norm):
        return "layernorm"
    if is_op(node, aten.rsqrt, aten.sqrt):
        variance, _ = _split_eps(node.args[0])
        return _variance_kind(variance)
    return None


def _split_eps(node: Any) -> tuple[Any, Any]:
    """(variance, eps operand) of `variance + eps`; eps is 0.0 when there is no add."""
    if is_op(node, aten.add) and len(node.args) == 2 and "alpha" not in node.kwargs:
        a, b = node.args
        if _variance_kind(a) is not None:
            return a, b
        if _variance_kind(b) is not None:
            return b, a
    return node, 0.0


def _variance_kind(node: Any) -> NormKind | None:
    if is_op(node, aten.var):
        return "layernorm"
    if node is None or not is_op(node, aten.mean) or node.target is not aten.mean.dim:
        return None
    squared = squared_operand(node.args[0])
    if squared is None:
        return None
    return "layernorm" if centered_parts(squared) is not None else "rmsnorm"


def squared_operand(node: Any) -> fx.Node | None:
    """y for `y ** 2`, `y * y` or `square(y)`."""
    if is_op(node, aten.pow) and scalar_value(node.args[1]) == 2.0 and isinstance(node.args[0], fx.Node):
        return node.args[0]
    if is_op(node, aten.square):
        return node.args[0]
    if is_op(node, aten.mul) and same_value(node.args[0], node.args[1]) and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def centered_parts(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """(x, mean) when `node` is `x - mean(x, -1, keepdim=True)`."""
    if not is_op(node, aten.sub) or "alpha" in node.kwargs or len(node.args) != 2:
        return None
    x, mu = node.args
    if not is_op(mu, aten.mean) or mu.target is not aten.mean.dim or not same_value(mu.args[0], x):
        return None
    return (x, mu) if _reduces_last_dim_only(mu) else None


# -------------------------------------------------------------------------------------------- statistics
def _reduce_dims(node: fx.Node) -> tuple[Any, bool]:
    if node.target is aten.var.correction:
        return node.kwargs.get("dim", arg(node, 1, "dim")), bool(node.kwargs.get("keepdim", False))
    return arg(node, 1, "dim"), bool(arg(node, 2 if is_op(node, aten.mean) else 3, "keepdim", False))


def _reduces_last_dim_only(node: fx.Node) -> bool:
    dims, keepdim = _reduce_dims(node)
    source = operand(node)
    return keepdim and isinstance(dims, (list, tuple)) and len(dims) == 1 and is_last_dim(source, dims[0])


def _check_reduction(node: fx.Node) -> None:
    dims, keepdim = _reduce_dims(node)
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or not is_last_dim(operand(node), dims[0]):
        raise Decline(f"statistics reduce over dims {dims}; only the last dim is supported")
    if not keepdim:
        raise Decline("statistics are reduced without keepdim")


def _var_correction(node: fx.Node) -> float:
    if node.target is aten.var.correction:
        correction: Any = node.kwargs.get("correction")
        return 1.0 if correction is None else float(correction)
    return 1.0 if arg(node, 2, "unbiased", True) else 0.0


def _statistics(anchor: fx.Node) -> tuple[fx.Node, ScalarArg, set[fx.Node]]:
    """(x, eps, nodes) of the `variance (+ eps)` under the inverse root `anchor`."""
    variance, eps_operand = _split_eps(operand(anchor))
    eps = _eps_arg(eps_operand)
    _check_reduction(variance)
    nodes: set[fx.Node] = {anchor, variance, operand(anchor)}
    if is_op(variance, aten.var):
        if _var_correction(variance) != 0.0:
            raise Decline("variance uses Bessel's correction; a norm needs correction=0")
        return operand(variance), eps, nodes
    square = operand(variance)
    squared = squared_operand(square)
    assert squared is not None  # guaranteed by norm_anchor_kind
    centered = centered_parts(squared)
    if centered is not None:
        return centered[0], eps, nodes | {square, squared, centered[1]}
    return squared, eps, nodes | {square}


# --------------------------------------------------------------------------------------------- normalize
def _inverse_roots(anchor: fx.Node, nodes: set[fx.Node]) -> list[fx.Node]:
    """Nodes holding 1/sqrt(variance): the rsqrt itself, or reciprocal(sqrt) (times a literal 1)."""
    if is_op(anchor, aten.rsqrt):
        return [anchor]
    roots = []
    for user in anchor.users:
        if is_op(user, aten.reciprocal):
            nodes.add(user)
            roots.append(user)
            roots += [u for u in user.users if _is_times_one(u, user)]
    return roots


def _is_times_one(node: fx.Node, source: fx.Node) -> bool:
    return (
        is_op(node, aten.mul)
        and node.args[0] is source
        and not isinstance(node.args[1], fx.Node)
        and (scalar_value(node.args[1]) == 1.0)
    )


def same_input(a: Any, b: fx.Node) -> bool:
    """Equal values, or one tensor seen before and after lossless upcasts (T5 squares x.float() but scales x)."""
    if same_value(a, b):
        return True
    return isinstance(a, fx.Node) and strip_widening_casts(a) is strip_widening_casts(b)


def _is_centered_input(node: Any, kind: NormKind, x: fx.Node) -> set[fx.Node] | None:
    """The nodes of `node` when it is the input the norm scales: x (RMS) or x - mean(x) (LayerNorm)."""
    if kind == "rmsnorm":
        return set() if same_input(node, x) else None
    parts = centered_parts(node)
    return {node, parts[1]} if parts is not None and same_input(parts[0], x) else None


def _normalized(anchor: fx.Node, kind: NormKind, x: fx.Node, nodes: set[fx.Node]) -> fx.Node:
    """The node computing centered(x) * rsqrt(...) or centered(x) / sqrt(...)."""
    for root in _inverse_roots(anchor, nodes):
        for user in root.users:
            if is_op(user, aten.mul) and not _is_times_one(user, root):
                found = _is_centered_input(other_operand(user, root), kind, x)
                if found is not None:
                    nodes |= found | {root, user}
                    return user
    for user in anchor.users:
        if user.target is aten.div.Tensor and user.args[1] is anchor:
            found = _is_centered_input(user.args[0], kind, x)
            if found is not None:
                nodes |= found | {user}
                return user
    raise Decline("the inverse square root does not scale the norm's input")


# ------------------------------------------------------------------------------------------- affine tail
def _follow_casts(node: fx.Node, nodes: set[fx.Node]) -> fx.Node:
    while (user := single_user(node)) is not None and cast_source(user) is node:
        nodes.add(user)
        node = user
    return node


def _is_vector(node: Any, width: int) -> bool:
    t = tensor_val(node)
    return t is not None and t.dim() == 1 and static_dim(t.shape[0]) == width and t.dtype.is_floating_point


def _is_gain(node: Any, width: int) -> bool:
    """A per-feature weight: a `width` vector, or one value for every feature (ScaleNorm's gain, shape () or (1,)),
    which the rewrite expands to `width`."""
    t = tensor_val(node)
    return _is_vector(node, width) or (t is not None and t.dim() <= 1 and t.numel() == 1 and t.dtype.is_floating_point)


def _weight_operand(node: Any, width: int) -> tuple[fx.Node, float] | None:
    """(weight, offset) for a `weight` or `offset + weight` multiplier (Gemma's `1 + w`)."""
    if _is_gain(node, width) and is_op(node, aten.add) and "alpha" not in node.kwargs:
        for param, const in (node.args, node.args[::-1]):
            offset = scalar_value(const)
            if offset is not None and not isinstance(const, fx.Node) and _is_gain(param, width):
                return param, offset
    return (node, 0.0) if _is_gain(node, width) else None


def affine_tail(y: fx.Node, m: NormMatch, nodes: set[fx.Node]) -> fx.Node:
    """Absorb casts, `* weight` and (LayerNorm) `+ bias` after the normalized value; returns the output."""
    node = _follow_casts(y, nodes)
    user = single_user(node)
    if is_op(user, aten.mul) and user is not None:
        multiplier = other_operand(user, node)
        parsed = _weight_operand(multiplier, m.width)
        if parsed is not None:
            # The LayerNorm op has no offset argument: it takes the computed `w + offset` as its weight.
            m.weight, m.weight_offset = parsed if m.kind == "rmsnorm" or parsed[1] == 0.0 else (multiplier, 0.0)
            nodes.add(user)
            node = _follow_casts(user, nodes)
    user = single_user(node)
    if m.kind == "layernorm" and is_op(user, aten.add) and user is not None and "alpha" not in user.kwargs:
        bias = other_operand(user, node)
        if _is_vector(bias, m.width):
            m.bias = bias
            nodes.add(user)
            node = _follow_casts(user, nodes)
    return node


# ---------------------------------------------------------------------------------------------- matchers
def match_norm(node: fx.Node, kind: NormKind) -> NormMatch:
    """Describe the norm anchored at `node` (see `norm_anchor_kind`); raises Decline when it cannot fuse."""
    if is_op(node, aten.rms_norm, aten.layer_norm, aten.native_layer_norm):
        return _match_norm_op(node, kind)
    return _match_manual(node, kind)


def _eps_arg(eps: Any) -> ScalarArg:
    """eps as the op takes it: a constant, or a run-time scalar (a float attribute under dynamic=True)."""
    value = scalar_arg(eps)
    if value is None:
        raise tensor_scalar_decline("norm eps", eps)
    scalar_hint(value)  # a run-time eps without an example value declines here
    return value


def norm_width(x: fx.Node) -> int:
    """The normalized width; a symbolic one is specialized (the kernels are built per width)."""
    value = tensor_val(x)
    if value is None or value.dim() == 0:
        raise Decline("the norm input has no shape")
    return fixed_size(value.shape[-1], "normalized width")


def _match_manual(anchor: fx.Node, kind: NormKind) -> NormMatch:
    x, eps, nodes = _statistics(anchor)
    m = NormMatch(kind, x, [], eps, norm_width(x))
    output = affine_tail(_normalized(anchor, kind, x, nodes), m, nodes)
    m.outputs = [output]
    m.region = checked_region(x, output, nodes)
    return m


def checked_region(x: fx.Node, output: fx.Node, nodes: set[fx.Node]) -> set[fx.Node]:
    """The nodes between x and output, which must all belong to the pattern and stay inside it."""
    region = region_between(output.graph, [x], output)
    order = node_order(output.graph)
    extra = sorted(region - nodes, key=order.__getitem__)
    if extra:
        raise Decline(f"{op_name(extra[0])} between the input and the output is not part of the norm")
    escaping = sorted(escaping_nodes(region, output), key=order.__getitem__)
    if escaping:
        raise Decline(f"intermediate {op_name(escaping[0])} is used outside the norm")
    return region


def _op_eps(node: fx.Node, x: fx.Node) -> ScalarArg:
    """eps of a norm op; rms_norm's None means machine epsilon of its compute dtype (fp32 for half types)."""
    index, default = (3, None) if is_op(node, aten.rms_norm) else (4, 1e-5)
    eps = arg(node, index, "eps", default)
    dtype = dtype_of(x)
    if eps is None and dtype is not None:
        return float(torch.finfo(compute_dtype(dtype)).eps)
    return _eps_arg(eps)


def _match_norm_op(node: fx.Node, kind: NormKind) -> NormMatch:
    x = node.args[0]
    if not isinstance(x, fx.Node):
        raise Decline("the norm input is not a tensor node")
    shape = arg(node, 1, "normalized_shape")
    if len(shape) != 1:
        raise Decline(f"normalizes over the last {len(shape)} dims; only the last dim is supported")
    width = norm_width(x)
    if fixed_size(shape[0], "normalized_shape") != width:
        raise Decline(f"normalized_shape {list(shape)} does not match the last dim {width}")
    m = NormMatch(kind, x, [node], _op_eps(node, x), width, weight=arg(node, 2, "weight"), region={node})
    if kind == "layernorm":
        m.bias = arg(node, 3, "bias")
    if is_op(node, aten.native_layer_norm):
        m.outputs = _native_outputs(node)
        m.region |= set(node.users)
    elif m.weight is None and m.bias is None:
        _absorb_affine(node, m)
    return m


def _absorb_affine(node: fx.Node, m: NormMatch) -> None:
    """A parameter-free norm op followed by `* weight [+ bias]` (x-transformers' LayerNorm · (gamma + 1)): the op
    takes them. Left as it is when the tail is not the norm's alone."""
    nodes = {node}
    output = affine_tail(node, m, nodes)
    try:
        m.region = checked_region(m.x, output, nodes)
    except Decline:
        m.weight, m.bias, m.weight_offset = None, None, 0.0
        return
    m.outputs = [output]


def _native_outputs(node: fx.Node) -> list[fx.Node]:
    """The getitem(0) nodes of native_layer_norm; mean and rstd (outputs 1, 2) must be unused."""
    outputs = []
    for user in node.users:
        if user.target is not operator.getitem:
            raise Decline("native_layer_norm's result tuple is used whole")
        if user.args[1] != 0 and user.users:
            raise Decline("native_layer_norm's mean/rstd outputs are used")
        if user.args[1] == 0:
            outputs.append(user)
    return outputs
