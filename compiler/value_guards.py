"""Run-time guards for proofs made from module values (passes/buffer_masks.py).

A mask proven causal from a buffer's values is right only while the buffer holds them. Each guarded input is
checked before every call by identity, data pointer and version counter (no value is read): an in-place write
(`bias.fill_(1)`), `bias.data = ...`/`set_` or replacing the attribute (`model.bias = t`) all fail it, and the call
then runs a graph compiled without proofs from values, which reads the buffer as a data mask. Writes through
`bias.data` (which has a version counter of its own) are not seen: write to the buffer itself.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..passes.buffer_masks import (
    MODULE_NAME,
    MODULE_VALUE,
    forget_module_values,
    mark_module_values,
    proved_placeholders,
)

__all__ = ["guard_module_values", "mark_module_values"]

log = logging.getLogger("tilefuse")


@dataclass(frozen=True)
class ValueGuard:
    """Input `index` is still the tensor whose values were read, unchanged since."""

    index: int
    name: str
    tensor: weakref.ref[torch.Tensor]
    data_ptr: int
    version: int

    @classmethod
    def of(cls, index: int, name: str, tensor: torch.Tensor) -> ValueGuard:
        return cls(index, name, weakref.ref(tensor), tensor.data_ptr(), tensor._version)

    def holds(self, args: Sequence[Any]) -> bool:
        current = args[self.index]
        if current is not self.tensor() or not isinstance(current, torch.Tensor):
            return False
        return current.data_ptr() == self.data_ptr and current._version == self.version


def value_guards(gm: fx.GraphModule) -> list[ValueGuard]:
    """One guard per input whose value a pass relied on; call before `forget_module_values`."""
    return [
        ValueGuard.of(i, node.meta.get(MODULE_NAME, node.name), node.meta[MODULE_VALUE])
        for i, node in proved_placeholders(gm)
    ]


def is_dynamic(example_inputs: Sequence[Any]) -> bool:
    """Whether the graph takes symbolic sizes (a graph compiled on one call's values would not fit the next)."""
    return any(isinstance(x, torch.SymInt) for x in example_inputs)


def guard_values(
    compiled: Callable[..., Any],
    guards: Sequence[ValueGuard],
    unproven: Callable[[list[Any]], Callable[..., Any]],
    eager: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """`compiled` while every guard holds; otherwise the graph without proofs from values: `eager` when given (the
    graph as Dynamo traced it, for graphs with symbolic sizes), else `unproven(args)` compiled on the first call
    that fails a guard (the graph's sizes are static, so it fits every later call)."""
    if not guards:
        return compiled
    fallback: list[Callable[..., Any]] = []

    def run(*args: Any) -> Any:
        if all(guard.holds(args) for guard in guards):
            return compiled(*args)
        if not fallback:
            changed = ", ".join(g.name for g in guards if not g.holds(args))
            log.warning(
                "tilefuse: %s changed since a mask was proven from its values; running the graph that reads it "
                "as a data mask",
                changed,
            )
            fallback.append(eager if eager is not None else unproven(list(args)))
        return fallback[0](*args)

    return run


def guard_module_values(
    compiled: Callable[..., Any],
    fused: fx.GraphModule,
    dynamo_gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    recompile: Callable[[fx.GraphModule, list[Any]], Callable[..., Any]],
) -> Callable[..., Any]:
    """The backend's hook after the inner compile: guard `compiled` on the module values its passes relied on
    (`recompile(dynamo_gm, args)` compiles the graph without proofs from values) and drop the passes' references to
    those values."""
    guards = value_guards(fused)
    forget_module_values(fused)
    if guards:
        log.info("tilefuse: masks proven from the values of %s, guarded at run time", [g.name for g in guards])
    eager = dynamo_gm.forward if is_dynamic(example_inputs) else None
    return guard_values(compiled, guards, lambda args: recompile(dynamo_gm, args), eager)
