"""Offline entry points: explain (what would be fused and why not) and export (torch.export + passes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .backend import TilefuseBackend
from .options import Options
from .pipeline import run_pipeline
from .report import FusionReport


def _check_inputs(model: Any, example_inputs: Sequence[Any]) -> tuple[Any, ...]:
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, Sequence):
        raise TypeError("example_inputs must be a tuple or list of inputs, e.g. (input_ids,)")
    return tuple(example_inputs)


def explain(model: Any, example_inputs: Sequence[Any], *, training: bool = False, **options: Any) -> FusionReport:
    """Compile `model` with tilefuse (inner compiler eager unless given), run it once, return the report.

    The run is an inference run (grad disabled) unless `training=True`; some graphs differ between the two.
    """
    inputs = _check_inputs(model, example_inputs)
    options.setdefault("inner", "eager")
    backend = TilefuseBackend(Options.from_any(None, **options))
    with torch.set_grad_enabled(training):
        torch.compile(model, backend=backend)(*inputs)
    return backend.report


def export(
    model: torch.nn.Module, example_inputs: Sequence[Any], **options: Any
) -> tuple[torch.export.ExportedProgram, FusionReport]:
    """torch.export the model, then rewrite its graph with the tilefuse passes in place."""
    inputs = _check_inputs(model, example_inputs)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"export needs an nn.Module, got {type(model).__name__}")
    program = torch.export.export(model, inputs)
    _, ctx = run_pipeline(program.graph_module, Options.from_any(None, **options))
    report = FusionReport()
    report.extend(ctx.sites, ctx.counters)
    return program, report
