"""Compile overhead for 2- to 32-layer Llama configs (tiny widths; CPU is enough): tilefuse's capture, passes and
inner compile next to the same inner compiler without tilefuse, first-call wall time (Dynamo tracing included)."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import tilefuse

from .harness import Context, Record, max_rel_error, release_memory
from .models import TINY, llama, token_ids, transformers_missing, with_layers

NAME = "compile"
METRIC = "total_s"
X_AXIS = "layers"
log = logging.getLogger("tilefuse.benchmarks")
BASELINE = {"inductor": "inductor", "eager": "aot_eager"}  # the inner compiler alone, for the difference
TOLERANCE = 1e-3  # fp32 compiled vs eager, relative to max |logits|


def _compile_once(layers: int, backend: Any, ctx: Context) -> tuple[float, Any, torch.Tensor, torch.Tensor]:
    torch._dynamo.reset()
    shape = with_layers(TINY, layers)
    model = llama(shape, attn="eager", seq=64).to(ctx.device)
    ids = token_ids(shape, 1, 64, ctx.device)
    with torch.no_grad():
        expected = model(ids)
        start = time.perf_counter()
        got = torch.compile(model, backend=backend, fullgraph=True)(ids)
        if ctx.is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - start, backend, got, expected


def _measure(layers: int, contender: str, make_backend: Callable[[], Any], ctx: Context, repeats: int) -> Record:
    params = {
        "series": f"inner={ctx.inner}",
        "layers": layers,
        "inner": ctx.inner,
        "repeats": repeats,
        **with_layers(TINY, layers).params(),
    }
    record = Record(NAME, f"compile {layers} layers", params, contender, "ok", tolerance=TOLERANCE)
    runs: list[dict[str, float]] = []
    try:
        for _ in range(repeats):
            total, backend, got, expected = _compile_once(layers, make_backend(), ctx)
            record.max_rel_err = max_rel_error(got, expected)
            run = {"total_s": total}
            if isinstance(backend, tilefuse.TilefuseBackend):
                timings = backend.report.timings_s
                run |= {"capture_s": timings["capture"], "passes_s": timings["passes"],
                        "inner_compile_s": timings["inner_compile"]}  # fmt: skip
                record.params["sites"] = backend.report.summary()
            runs.append(run)
    except Exception as err:
        record.status, record.reason = "error", f"{type(err).__name__}: {str(err)[:300]}"
        return record
    if record.max_rel_err is not None and record.max_rel_err > TOLERANCE:
        record.status, record.reason = "check_failed", f"compiled logits differ: {record.max_rel_err:.3g}"
        return record
    record.metrics = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    record.timing = f"first-call wall time, median of {repeats}"
    return record


def run(ctx: Context) -> list[Record]:
    if missing := transformers_missing():
        return [Record(NAME, "compile", {}, "tilefuse", "unavailable", missing)]
    layer_counts, repeats = ((2, 4), 1) if ctx.tiny else ((2, 8, 16, 32), 3)
    contenders: dict[str, Callable[[], Any]] = {
        "tilefuse": lambda: tilefuse.TilefuseBackend(tilefuse.Options(inner=ctx.inner, strict=True)),
        BASELINE[ctx.inner]: lambda: BASELINE[ctx.inner],
    }
    for name, make_backend in contenders.items():  # the first compile in a process pays one-off imports
        if ctx.wants(name):
            _compile_once(1, make_backend(), ctx)
    records: list[Record] = []
    for layers in layer_counts:
        if not ctx.selected(f"compile {layers} layers"):
            continue
        layer_records = []
        for name, make_backend in contenders.items():
            if ctx.wants(name):
                log.info("compile: %d layers, %s", layers, name)
                layer_records.append(_measure(layers, name, make_backend, ctx, repeats))
        _overhead(layer_records)
        records += layer_records
        release_memory(ctx.device)
    return records


def _overhead(records: list[Record]) -> None:
    """tilefuse's added compile time over the bare inner compiler, within this run."""
    by_name = {r.contender: r for r in records if r.status == "ok"}
    if "tilefuse" in by_name and len(by_name) == 2:
        base = next(r for n, r in by_name.items() if n != "tilefuse")
        tf_total, base_total = by_name["tilefuse"].metrics.get("total_s"), base.metrics.get("total_s")
        if tf_total and base_total:
            by_name["tilefuse"].metrics["overhead_s"] = tf_total - base_total
