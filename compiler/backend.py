"""The `tilefuse` torch.compile backend: ATen capture → passes → AOTAutograd + inner compiler.

A failure anywhere in tilefuse falls back to compiling the unfused graph, with a warning and a counter,
unless `strict=True`. Dynamo's global `suppress_errors` is never touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.exc import RestartAnalysis

from ..passes.fastpath import module_advice
from .capture import CaptureDeclined, dynamo_graph_to_aten
from .hop_bodies import prepare_bodies_for_autograd
from .options import Options
from .pipeline import run_pipeline
from .region_breaks import region_break_advice
from .report import FusionReport
from .value_guards import guard_module_values, mark_module_values

log = logging.getLogger("tilefuse")

# Sites seen by every `backend="tilefuse"` compile in this process (explain() and tilefuse.compile keep their own).
GLOBAL_REPORT = FusionReport()
REPORT_ATTRIBUTE = "tilefuse_report"  # what tilefuse.compile's result carries its FusionReport as


def inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> Callable[..., Any]:
    """AOTAutograd plus the inner compiler for everything tilefuse left in the graph."""
    if options.inner == "eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, list(example_inputs))
    from torch._inductor.compile_fx import compile_fx

    from .cache_salt import salted_inductor_cache

    with salted_inductor_cache():  # a cached graph of another tilefuse version must not be replayed
        return compile_fx(gm, list(example_inputs))  # type: ignore[return-value]


def _choose_tile_configs(sites: Sequence[Any], options: Options, training: bool) -> None:
    """Fill the autotune registry for every kernel of the fused sites (a database lookup; never raises, see
    autotune.registry); `training` lets mode "measure" search the backward kernels too."""
    if options.autotune == "off":
        return
    from ..autotune.registry import resolve_sites

    resolve_sites(sites, options.autotune, options.tuning_db, training=training)


def _needs_backward(example_inputs: Sequence[Any]) -> bool:
    """Whether this graph will run a backward: grad is on and some input requires it."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


class TilefuseBackend:
    """A backend instance with fixed options and its own FusionReport."""

    def __init__(self, options: Options | None = None, report: FusionReport | None = None) -> None:
        self.options = options or Options()
        self.report = report if report is not None else FusionReport()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *, values: bool = True) -> Callable[..., Any]:
        """Compile Dynamo's graph; `values=False` proves nothing from module values (see compiler/value_guards)."""
        logging.getLogger("tilefuse").setLevel(self.options.log_level.upper())
        if self.options.dump_kernels is not None:
            from ..codegen import emit

            emit.set_dump_dir(self.options.dump_kernels)
        for advice in region_break_advice():  # regions Dynamo ran eagerly before this graph: told with the fix
            self.report.add_advice(advice)
        timings = self.report.timings_s
        try:
            start = time.perf_counter()
            fused = dynamo_graph_to_aten(gm, example_inputs)
            if values:
                mark_module_values(fused, gm, example_inputs)
            timings["capture"] += time.perf_counter() - start
            start = time.perf_counter()
            fused, ctx = run_pipeline(fused, self.options)
            timings["passes"] += time.perf_counter() - start
            start = time.perf_counter()
            _choose_tile_configs(ctx.sites, self.options, _needs_backward(example_inputs))
            timings["autotune_lookup"] += time.perf_counter() - start
            start = time.perf_counter()
            prepare_bodies_for_autograd(fused)
            compiled = inner_compile(fused, example_inputs, self.options)
            compiled = guard_module_values(compiled, fused, gm, example_inputs, self._without_value_proofs)
            timings["inner_compile"] += time.perf_counter() - start
            # Recorded only now: a restart signal from the inner compile (Dynamo calls again) or a fallback to the
            # unfused graph must not leave sites in the report that no compiled graph holds.
            self.report.extend(ctx.sites, ctx.counters, ctx.advice)
            log.info("tilefuse: %s", self.report.summary())
            return compiled
        except CaptureDeclined as declined:
            log.warning("tilefuse: %s", declined)
            self.report.fallbacks.append(f"declined: {declined}")
            self.report.counters["graph_declined"] += 1
            return inner_compile(gm, example_inputs, self.options)
        except Exception as err:
            if self.options.strict or isinstance(err, RestartAnalysis):
                # Dynamo's restart signals (e.g. AOTAutograd asking to re-trace with float scalars specialized)
                # are control flow, not failures: swallowing one would compile an unfused graph for no reason.
                raise
            log.warning("tilefuse: falling back to the unfused graph: %s: %s", type(err).__name__, err)
            self.report.fallbacks.append(f"{type(err).__name__}: {err}")
            self.report.counters["fallback"] += 1
            return inner_compile(gm, example_inputs, self.options)

    def _without_value_proofs(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """The graph compiled again with masks read from module values as data (a fresh report: no new sites)."""
        return TilefuseBackend(self.options)(gm, example_inputs, values=False)


def tilefuse_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | Options | None = None, **kwargs: Any
) -> Callable[..., Any]:
    """Entry point registered as `torch_dynamo_backends: tilefuse`; `options=` comes from torch.compile."""
    kwargs.pop("mode", None)  # torch.compile(mode=...) has no meaning here
    return TilefuseBackend(Options.from_any(options, **kwargs), GLOBAL_REPORT)(gm, example_inputs)


def compile(model: Any, *, fullgraph: bool = False, dynamic: bool | None = None, **options: Any) -> Any:
    """`torch.compile(model, backend="tilefuse")` with tilefuse options as keywords.

    The result (a module for a module, a function for a function) carries `tilefuse_report`: the FusionReport of
    every graph it compiles, filled as they compile (on the first call, and on each recompile), advice included.
    """
    backend = TilefuseBackend(Options.from_any(None, **options))
    backend.report.advice.extend(module_advice(model))  # what no graph can tell (fast paths)
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    # object.__setattr__: a compiled module forwards attribute writes to the user's module, which must stay as it was.
    object.__setattr__(compiled, REPORT_ATTRIBUTE, backend.report)
    return compiled
