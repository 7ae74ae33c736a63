"""Scalar operands of a site (attention scale and softcap, norm eps) that may be known only at run time.

Under `dynamic=True` (or `mark_dynamic`) such a scalar reaches the captured graph as a node whose value is a
SymFloat or SymInt: Dynamo turns a float attribute (`self.eps`, `self.scaling`) into a 0-d tensor input read with
`item()`, and a scale computed from a symbolic size (`1 / math.sqrt(q.size(-1))`) is a SymFloat expression. The
passes hand that node to the fused op's `Scalar` argument instead of declining the site. AOTAutograd then
specializes an `item()` of a float attribute (its tensorify pass asks Dynamo to restart, and the next capture sees
the constant), while a scalar computed from sizes stays a run-time value: no recompile per sequence length.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .base import Decline, FixableDecline
from .graph import aten, insert_call, is_op, scalar_value, val

# A site's scalar: a constant, or the node computing it at run time.
ScalarArg = float | fx.Node


class ScalarDecline(FixableDecline):
    """A site declined for a scalar operand the fused op cannot take, with the fix the user can apply."""


def tensor_scalar_decline(what: str, node: Any) -> ScalarDecline:
    """The decline for a scalar operand that is a tensor (a 0-d buffer or parameter, not a constant)."""
    name = getattr(node, "name", node)
    return ScalarDecline(
        f"{what} is a tensor-valued factor ({name}), not a number",
        f"tensor_{what.replace(' ', '_')}",
        f"keep the {what} a Python float (or compute it from tensor sizes) so the fused op can take it as a "
        "scalar; a learned scale can be folded into a projection weight",
    )


def symbolic_scalar(x: Any) -> fx.Node | None:
    """The node when `x` computes a Python scalar known only at run time (its value is a SymFloat or SymInt),
    seen through `scalar_tensor`, which only boxes it as a 0-d tensor; None otherwise."""
    if is_op(x, aten.scalar_tensor):
        return symbolic_scalar(x.args[0])
    if isinstance(x, fx.Node) and isinstance(val(x), (torch.SymFloat, torch.SymInt)):
        return x
    return None


def scalar_arg(x: Any) -> ScalarArg | None:
    """A constant (`scalar_value`) or a run-time scalar node (`symbolic_scalar`); None for anything else."""
    value = scalar_value(x)
    return value if value is not None else symbolic_scalar(x)


def scalar_hint(x: ScalarArg) -> float:
    """The value `x` had when the graph was captured (a symbol's example value)."""
    if not isinstance(x, fx.Node):
        return float(x)
    value = val(x)
    node = getattr(value, "node", None)
    if node is not None and node.has_hint():
        return float(node.hint)
    raise ScalarDecline(
        f"run-time scalar {x.name} is data-dependent (no example value at capture)",
        "data_dependent_scalar",
        "compute the attention scale, softcap or norm eps from Python numbers or tensor sizes, not from .item() of "
        "a tensor inside the compiled region",
    )


def fixed_scalar(x: Any, what: str) -> float:
    """A scalar the op takes as a fixed float (dropout p). A run-time value is specialized: converting it adds a
    guard (Dynamo restarts or recompiles when it changes); a data-dependent one declines."""
    value = scalar_value(x)
    if value is not None:
        return value
    try:
        return float(x.meta["val"] if isinstance(x, fx.Node) else x)
    except Exception as err:
        raise Decline(f"{what} {getattr(x, 'name', x)} is not a number: {type(err).__name__}") from err


def is_nonzero(x: ScalarArg) -> bool:
    """False only for a constant 0 (a run-time scalar may be anything, so it counts as set)."""
    return isinstance(x, fx.Node) or x != 0.0


@dataclass(frozen=True)
class ScalarProduct:
    """const · Π node^±1: a scale collected from several factors, some of which are known only at run time.

    Matching records factors without touching the graph; `emit` inserts the arithmetic when the site is rewritten.
    """

    const: float = 1.0
    factors: tuple[tuple[fx.Node, int], ...] = ()  # (run-time scalar node, +1 multiplies / -1 divides)

    def times(self, x: ScalarArg, power: int = 1) -> ScalarProduct:
        """This product multiplied by `x` (power +1) or divided by it (power -1); a division by a constant 0
        declines (the scores would be inf or NaN)."""
        if isinstance(x, fx.Node):
            return ScalarProduct(self.const, (*self.factors, (x, power)))
        if power < 0 and x == 0.0:
            raise Decline("attention scores are divided by zero")
        return ScalarProduct(self.const * (x if power > 0 else 1.0 / x), self.factors)

    def mul(self, other: ScalarProduct) -> ScalarProduct:
        return ScalarProduct(self.const * other.const, self.factors + other.factors)

    @property
    def dynamic(self) -> bool:
        return bool(self.factors)

    def hint(self) -> float:
        """The product's value at capture."""
        value = self.const
        for node, power in self.factors:
            factor = scalar_hint(node)
            if power < 0 and factor == 0.0:
                raise Decline(f"attention scores are divided by the run-time scalar {node.name}, 0 at capture")
            value = value * factor if power > 0 else value / factor
        return value

    def emit(self, graph: fx.Graph) -> ScalarArg:
        """The constant, or a node computing the product, inserted at the graph's insertion point."""
        out: ScalarArg = self.const
        for node, power in self.factors:
            if power > 0 and isinstance(out, float) and out == 1.0 and isinstance(val(node), torch.SymFloat):
                out = node  # a SymInt is multiplied by 1.0: the op's kernels take the scale as a float
            else:
                out = insert_call(graph, operator.mul if power > 0 else operator.truediv, (out, node))
        return out
