"""Recognize norms whose statistic is a vector norm: `F.normalize`, `torch.linalg.vector_norm`, `Tensor.norm`, or
the square root of a mean or sum of squares, divided into the input they were taken of.

eps is placed exactly as written (NormSpec.eps_mode): F.normalize clamps the norm (x / max(‖x‖₂, eps)),
`x / (norm + eps)` adds it to the norm, `x / sqrt(mean(x²))` has none. Positive constant factors on the norm and on
the normalized value (x-transformers' `F.normalize(x) * sqrt(d)`) fold into `norm_scale` and eps, so that spelling
is an RMSNorm whose eps clamps the RMS. Only structures that divide a tensor by its own norm are sites at all;
among those, a norm that is not a 2-norm over the last axis is declined with what it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..specs import EpsMode
from .base import Decline
from .graph import arg, aten, dtype_of, is_op, scalar_value
from .match_common import is_last_dim, operand, other_operand
from .norm_match import (
    NormKind,
    NormMatch,
    affine_tail,
    centered_parts,
    checked_region,
    norm_width,
    same_input,
    squared_operand,
)


@dataclass
class VectorNorm:
    """x / f(stat), a tensor divided by its own norm: the nodes from the statistic to the normalized value, and
    where eps went. Found once per anchor by `vector_norm_site`, then described by `match_vector_norm`."""

    stat: fx.Node  # linalg_vector_norm or sqrt
    x: fx.Node  # what the statistic was taken of
    normalized: fx.Node  # x / (...) or x * reciprocal(...)
    factor: float = 1.0  # the divisor is f(factor · stat, eps): constant factors met on the way fold in here
    eps_mode: EpsMode = "mean_square"
    eps: float = 0.0
    nodes: set[fx.Node] = field(default_factory=set)
    centered: tuple[fx.Node, fx.Node] | None = None  # (input, mean) when x = input - mean under sqrt, without eps

    @property
    def kind(self) -> NormKind:
        return "layernorm" if self.centered is not None else "rmsnorm"


# ------------------------------------------------------------------------------------------------ anchors
def vector_norm_site(node: fx.Node) -> VectorNorm | None:
    """The division when `node` is the statistic of a tensor divided by its own norm, else None."""
    site = _division(node)
    if site is not None and is_op(node, aten.sqrt) and site.eps_mode == "mean_square":
        site.centered = centered_parts(site.x)  # (x - mean) / sqrt(mean((x - mean)²)): a LayerNorm with eps 0
    return site


def _statistic_input(node: fx.Node) -> fx.Node | None:
    """x for `linalg_vector_norm(x, ...)` (any order and dims: checked when matching) or sqrt(mean|sum(x²))."""
    if is_op(node, aten.linalg_vector_norm) and isinstance(node.args[0], fx.Node):
        return node.args[0]
    reduced = node.args[0] if is_op(node, aten.sqrt) else None
    if isinstance(reduced, fx.Node) and reduced.target in (aten.mean.dim, aten.sum.dim_IntList):
        return squared_operand(reduced.args[0])
    return None


def _constant_factor(node: fx.Node, source: fx.Node) -> float | None:
    """c when `node` is source · c or source / c for a positive, finite constant c."""
    if not is_op(node, aten.mul, aten.div) or len(node.args) != 2 or node.kwargs:
        return None
    if node.target is aten.div.Tensor and node.args[0] is not source:
        return None
    const = other_operand(node, source)
    value = None if const is source else scalar_value(const)
    if value is None or not 0.0 < value < math.inf:
        return None
    return 1.0 / value if is_op(node, aten.div) else value


def _follow_factors(node: fx.Node, d: VectorNorm, eps_too: bool) -> fx.Node:
    """Walk through constant factors applied to the divisor (eps_too: after eps was added, which they scale)."""
    moved = True
    while moved:
        moved = False
        for user in node.users:
            factor = _constant_factor(user, node)
            if factor is not None:
                d.factor *= factor
                d.eps *= factor if eps_too else 1.0
                d.nodes.add(user)
                node, moved = user, True
                break
    return node


def _eps_step(node: fx.Node, d: VectorNorm) -> fx.Node:
    """Absorb `clamp_min(norm, eps)` / `clamp(norm, min=eps)` or `norm + eps`; eps is rounded to the 16-bit dtype
    the clamp or add runs in (F.normalize's 1e-12 is 0 in float16)."""
    for user in node.users:
        eps, mode = _eps_of(user, node)
        if mode is not None and eps is not None:
            dtype = dtype_of(user)
            half = dtype is not None and dtype.is_floating_point and dtype.itemsize < 4
            d.eps_mode, d.eps = mode, float(torch.tensor(eps, dtype=dtype)) if half else eps
            d.nodes.add(user)
            return user
    return node


def _eps_of(user: fx.Node, node: fx.Node) -> tuple[float | None, EpsMode | None]:
    if is_op(user, aten.clamp_min) and user.args[0] is node:
        return scalar_value(user.args[1]), "clamp_norm"
    if is_op(user, aten.clamp) and user.args[0] is node and arg(user, 2, "max") is None:
        return scalar_value(arg(user, 1, "min")), "clamp_norm"
    if is_op(user, aten.add) and len(user.args) == 2 and not user.kwargs:
        return scalar_value(other_operand(user, node)), "add_norm"
    return None, None


def _divides(divisor: fx.Node, x: fx.Node, d: VectorNorm) -> fx.Node | None:
    """The node computing x / divisor (or x * reciprocal(divisor)) for the statistic's own input x."""
    for user in divisor.users:
        if is_op(user, aten.expand, aten.expand_as) and user.args[0] is divisor:
            found = _divides(user, x, d)
            if found is not None:
                d.nodes.add(user)
                return found
        if user.target is aten.div.Tensor and user.args[1] is divisor and _numerator(user.args[0], x, d):
            return user
        if is_op(user, aten.reciprocal):
            for mul in user.users:
                if is_op(mul, aten.mul) and _numerator(other_operand(mul, user), x, d):
                    d.nodes.add(user)
                    return mul
    return None


def _numerator(node: Any, x: fx.Node, d: VectorNorm) -> bool:
    """Whether `node` is x, or c · x for a positive constant c (folded like a factor on the output)."""
    if same_input(node, x):
        return True
    if not isinstance(node, fx.Node) or not is_op(node, aten.mul) or len(node.args) != 2:
        return False
    for source in node.args:
        factor = _constant_factor(node, source) if same_input(source, x) and isinstance(source, fx.Node) else None
        if factor is not None:
            d.factor, d.eps = d.factor / factor, d.eps / factor
            d.nodes.add(node)
            return True
    return False


def _division(stat: fx.Node) -> VectorNorm | None:
    x = _statistic_input(stat)
    if x is None:
        return None
    d = VectorNorm(stat, x, stat, nodes={stat})
    stages = (
        lambda n: _follow_factors(n, d, eps_too=False),
        lambda n: _eps_step(n, d),
        lambda n: _follow_factors(n, d, eps_too=True),
    )
    node, normalized = stat, _divides(stat, x, d)
    for stage in stages:  # the division is looked for first at each stage: another use of the norm is no step
        if normalized is not None:
            break
        node = stage(node)
        normalized = _divides(node, x, d)
    if normalized is None:
        return None
    d.normalized = normalized
    d.nodes.add(normalized)
    return d


# ----------------------------------------------------------------------------------------------- matching
def match_vector_norm(d: VectorNorm) -> NormMatch:
    """Describe the norm `vector_norm_site` found; raises Decline when it cannot fuse."""
    base = _base_scale(d)
    output = _fold_output_factors(d)
    kind: NormKind = "rmsnorm"
    x, norm_scale = d.x, d.factor * base
    # The LayerNorm op has no norm_scale: with one, an RMSNorm of the centered input, centering left outside.
    if d.centered is not None and math.isclose(norm_scale, 1.0, rel_tol=1e-12):
        kind, norm_scale = "layernorm", 1.0
        x, mean = d.centered
        d.nodes |= {d.x, mean}
    m = NormMatch(kind, x, [], d.eps, norm_width(x), eps_mode=d.eps_mode, norm_scale=norm_scale)
    output = affine_tail(output, m, d.nodes)
    m.outputs = [output]
    m.region = checked_region(x, output, d.nodes)
    return m


def _base_scale(d: VectorNorm) -> float:
    """The statistic over RMS(x): sqrt(width) for a 2-norm or a root sum of squares, 1 for a root mean square."""
    stat = d.stat
    if is_op(stat, aten.linalg_vector_norm):
        order, dims = arg(stat, 1, "ord", 2), arg(stat, 2, "dim")
        if scalar_value(order) != 2.0:
            raise Decline(f"an ord={order} vector norm: only the 2-norm is a root mean square")
        _check_last_dim(stat, d.x, dims, bool(arg(stat, 3, "keepdim", False)))
    else:
        reduced = operand(stat)
        d.nodes |= {reduced, operand(reduced)}
        dims = arg(reduced, 1, "dim")
        _check_last_dim(stat, d.x, dims, bool(arg(reduced, 2, "keepdim", False)))
        if is_op(reduced, aten.mean):
            return 1.0
    return math.sqrt(norm_width(d.x))


def _check_last_dim(stat: fx.Node, x: fx.Node, dims: Any, keepdim: bool) -> None:
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or not is_last_dim(x, dims[0]):
        raise Decline(f"statistics reduce over dims {dims}; only the last dim is supported")
    if not keepdim:
        raise Decline("statistics are reduced without keepdim")


def _fold_output_factors(d: VectorNorm) -> fx.Node:
    """Fold positive constant factors on the normalized value (`* sqrt(d)`) into norm_scale and eps: s · x / f(stat,
    eps) = x / f(stat / s, eps / s)."""
    node = d.normalized
    while len(node.users) == 1:
        (user,) = node.users
        factor = _constant_factor(user, node)
        if factor is None:
            break
        d.factor, d.eps = d.factor / factor, d.eps / factor
        d.nodes.add(user)
        node = user
    return node
