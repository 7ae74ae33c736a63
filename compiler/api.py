"""Offline entry points: explain (what would be fused and why not) and export (torch.export + passes)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..passes.fastpath import module_advice
from .backend import TilefuseBackend
from .options import Options
from .pipeline import run_pipeline
from .region_breaks import region_break_advice
from .report import FusionReport

log = logging.getLogger("tilefuse")

# Dynamo cache entries explain() allows per code object (each model explained through shared code adds one).
EXPLAIN_RECOMPILE_LIMIT = 256


def _check_inputs(model: Any, example_inputs: Sequence[Any]) -> tuple[Any, ...]:
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, Sequence):
        raise TypeError("example_inputs must be a tuple or list of inputs, e.g. (input_ids,)")
    return tuple(example_inputs)


def explain(model: Any, example_inputs: Sequence[Any], *, training: bool = False, **options: Any) -> FusionReport:
    """Compile `model` with tilefuse (inner compiler eager unless given), run it once, return the report.

    The run is an inference run (grad disabled) unless `training=True`; some graphs differ between the two.

    Models that share code (every HF model runs through the same wrapper `forward`) each add a Dynamo cache entry
    for it; past `torch._dynamo.config.recompile_limit` (8) Dynamo would run the next one eagerly and hand tilefuse
    nothing, so the limit is raised for the call. A run in which no graph reaches tilefuse says so in the report's
    `fallbacks` and in a warning instead of returning an empty report silently.
    """
    inputs = _check_inputs(model, example_inputs)
    options.setdefault("inner", "eager")
    backend = TilefuseBackend(Options.from_any(None, **options))
    backend.report.advice.extend(module_advice(model))  # what no graph can tell (fast paths)
    limit = max(torch._dynamo.config.recompile_limit, EXPLAIN_RECOMPILE_LIMIT)
    with torch.set_grad_enabled(training), torch._dynamo.config.patch(recompile_limit=limit):
        torch.compile(model, backend=backend)(*inputs)
    report = backend.report
    for advice in region_break_advice():  # a region that broke after the last graph reached the backend
        report.add_advice(advice)
    if report.graphs == 0 and not report.fallbacks:
        note = (
            "no graph reached tilefuse: Dynamo captured nothing or ran the model eagerly (see its warnings, e.g. a "
            "recompile limit; torch._dynamo.reset() clears its caches)"
        )
        log.warning("tilefuse.explain: %s", note)
        report.fallbacks.append(note)
    return report


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
    report.extend(ctx.sites, ctx.counters, ctx.advice)
    return program, report
