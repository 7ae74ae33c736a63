"""Prove causal and banded masks from values: of module state (a registered `tril` buffer, GPT-2/nanoGPT style), or
of a mask computed from constants alone (positions.constant_value).

Under Dynamo a module's buffers and tensor attributes are graph inputs whose real values reach the backend. The
backend marks the matching placeholders with their value (`mark_module_values`; trainable parameters are left out);
masks.py asks `band_of` whether such a value is a band `lower <= k - q <= upper` on its last two axes. A proof
from a value holds only while the value does: every placeholder whose value proved something is flagged, and the
backend guards the compiled graph on it (compiler/value_guards.py), so a buffer the user later changes is honoured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake

MODULE_VALUE = "tilefuse_module_value"  # placeholder meta: the real tensor of a module buffer
MODULE_NAME = "tilefuse_module_name"  # placeholder meta: where the value lives, as Dynamo names it
VALUE_PROVED = "tilefuse_value_proved"  # placeholder meta: set once a proof relied on that value
MAX_PROOF_ELEMENTS = 1 << 24  # larger buffers stay data masks: reading them at compile time would cost too much


@dataclass(frozen=True)
class Band:
    """Nonzero exactly where lower <= k - q <= upper (None: no bound on that side within the tensor)."""

    lower: int | None
    upper: int | None


def is_module_state(source: Any) -> bool:
    """Whether a Dynamo source names a module's buffer, parameter or tensor attribute (not a forward argument)."""
    from torch._dynamo import source as sources

    kinds = tuple(
        getattr(sources, name)
        for name in ("NNModuleSource", "ParamBufferSource", "UnspecializedParamBufferSource")
        if hasattr(sources, name)
    )
    while source is not None:
        if isinstance(source, kinds):
            return True
        source = getattr(source, "base", None)
    return False


def mark_module_values(aten_gm: fx.GraphModule, dynamo_gm: fx.GraphModule, example_inputs: Sequence[Any]) -> int:
    """Attach the real value of every module-state input to its placeholder in the captured graph (capture keeps
    Dynamo's placeholders in order, one for one); returns how many were marked."""
    ours = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    theirs = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    if len(ours) != len(theirs) or len(ours) != len(example_inputs):
        return 0
    marked = 0
    for node, source_node, value in zip(ours, theirs, example_inputs, strict=True):
        source = getattr(source_node.meta.get("grapharg"), "source", None)
        if _readable(value) and is_module_state(source):
            node.meta[MODULE_VALUE] = value
            node.meta[MODULE_NAME] = _source_name(source, source_node.name)
            marked += 1
    return marked


def _source_name(source: Any, default: str) -> str:
    name = getattr(source, "name", default)
    name = name() if callable(name) else name  # a method before torch 2.13, a property since
    return name if isinstance(name, str) else default


def _readable(value: Any) -> bool:
    """A real tensor whose values can be read now and whose changes the version counter tracks; not a trainable
    parameter (every optimizer step would change it)."""
    if not isinstance(value, torch.Tensor) or is_fake(value) or value.is_meta or value.is_inference():
        return False
    if value.requires_grad:
        return False
    return value.dim() >= 2 and value.numel() <= MAX_PROOF_ELEMENTS and not value.is_complex()


def proved_placeholders(gm: fx.GraphModule) -> list[tuple[int, fx.Node]]:
    """(input index, placeholder) of every input whose value a proof relied on."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [(i, n) for i, n in enumerate(placeholders) if n.meta.get(VALUE_PROVED)]


def forget_module_values(gm: fx.GraphModule) -> None:
    """Drop the references to real tensors once the passes ran (the compiled graph must not keep buffers alive)."""
    for node in gm.graph.nodes:
        node.meta.pop(MODULE_VALUE, None)


def band_of(node: Any, negate: bool = False) -> Band | None:
    """The band a module-state placeholder's value is (its zeros when `negate`), flagging the placeholder as relied
    on; None otherwise."""
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return None
    value = node.meta.get(MODULE_VALUE)
    if not isinstance(value, torch.Tensor):
        return None
    band = band_from_value(value, negate)
    if band is not None:
        node.meta[VALUE_PROVED] = True
    return band


def band_from_value(value: torch.Tensor, negate: bool = False) -> Band | None:
    """The band of `value`'s nonzeros (zeros when `negate`) over its last two axes (q, k), the same for every
    leading index; None when they are no band or there are none (an all-masked tensor stays data)."""
    if value.dim() < 2 or value.is_complex() or value.numel() == 0:
        return None
    with torch.no_grad():
        keep = ((value.detach() != 0) ^ negate).reshape(-1, value.shape[-2], value.shape[-1])
        first = keep[0]
        if not bool((keep == first).all()) or not bool(first.any()):
            return None
        rows, cols = first.shape
        distance = torch.arange(cols, device=first.device)[None, :] - torch.arange(rows, device=first.device)[:, None]
        lower, upper = int(distance[first].min()), int(distance[first].max())
        if not bool((first == ((distance >= lower) & (distance <= upper))).all()):
            return None
    return Band(lower if lower > 1 - rows else None, upper if upper < cols - 1 else None)
