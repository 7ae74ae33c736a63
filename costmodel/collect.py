"""Collect measurement records: every Spec of a shape grid × every config of its search space, measured on the GPU
(autotune.measure: output checked, do_bench quantiles) or refused by the constraints, appended to a record file.
Resumable: records already in the file are skipped. `interpreter_measure` times the Triton interpreter on CPU at
tiny shapes, for tests of the pipeline only; its records are marked `interpreted`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilefuse.autotune.records import Measurement
from tilefuse.autotune.space import build_space
from tilefuse.codegen.plan import TileConfig, TiledPlan
from tilefuse.specs import AttentionSpec, Spec

from .analytic import predict
from .hardware import GPUSpec
from .records import MeasurementRecord, iter_records, make_record, write_records

log = logging.getLogger("tilefuse.costmodel")

FAMILIES = ("attention",)  # the only kernel family that takes a tile config (autotune/space.py)
SHAPE_GRIDS = ("tiny", "small", "full")
FLUSH_EVERY = 32  # records per gzip member: an interrupted run loses at most this many measurements
TINY_CHOICES: dict[str, Sequence[int]] = {"block_m": (16, 32), "block_n": (16, 32), "num_warps": (4,),
                                          "num_stages": (1, 2)}  # fmt: skip
MeasureFn = Callable[[Spec, TileConfig], Measurement]


def _attention(batch: int, heads: int, group: int, seq: int, head_dim: int, dtype: str, causal: bool) -> AttentionSpec:
    return AttentionSpec(batch, heads, heads // group, seq, seq, head_dim, head_dim, dtype, head_dim**-0.5, causal,
                         gqa_group=group)  # fmt: skip


def shape_grid(family: str, grid: str) -> list[Spec]:
    """The Specs `collect` enumerates: "tiny" (interpreter tests), "small" (8 shapes), "full" (144 shapes, about
    16k query tokens per launch: batch × seq_len)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; collect supports {list(FAMILIES)} (the others take no tile config)")
    if grid == "tiny":
        return [_attention(1, 1, 1, seq, 16, "float32", False) for seq in (16, 32)]
    if grid == "small":
        return [_attention(max(1, 8192 // s), 16, 1, s, d, "bfloat16", c)
                for d in (64, 128) for s in (512, 2048) for c in (False, True)]  # fmt: skip
    if grid == "full":
        return [_attention(max(1, 16384 // s), 32, g, s, d, t, c)
                for t in ("bfloat16", "float16") for d in (64, 80, 128) for s in (128, 512, 1024, 2048, 4096, 8192)
                for g in (1, 4) for c in (False, True)]  # fmt: skip
    raise ValueError(f"shapes={grid!r}; expected one of {list(SHAPE_GRIDS)}")


def tool_versions(interpreted: bool) -> dict[str, str]:
    versions = {"triton_interpret": "1" if interpreted else "0"}
    for package in ("torch", "triton", "tilefuse"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def record_features(spec: Spec, config: TileConfig, gpu: GPUSpec, compiler: bool) -> dict[str, Any]:
    """The analytic model's breakdown (always) and the compiler's facts for `gpu.arch` (when `compiler`)."""
    plan = TiledPlan(spec, config)
    compiled = None
    if compiler:
        from .features import plan_features

        compiled = plan_features(plan, gpu.arch)
    estimate = predict(plan, gpu, compiled)
    analytic = {name: _finite(value) for name, value in estimate.to_dict().items()}
    return {"analytic": analytic, "compiler": compiled.to_dict() if compiled is not None else None}


@dataclass(frozen=True)
class Task:
    spec: Spec
    config: TileConfig
    rejected: tuple[str, ...]  # why the constraints refuse it; () when it is measured


@dataclass(frozen=True)
class CollectSummary:
    planned: int
    skipped: int  # already in the file
    written: int
    by_status: dict[str, int]


def plan_tasks(specs: Sequence[Spec], gpu: GPUSpec, choices: dict[str, Sequence[int]] | None = None) -> list[Task]:
    """Every (Spec, config) of the grid: the feasible ones to measure and the rejected ones, recorded as data."""
    tasks: list[Task] = []
    for spec in specs:
        try:
            space = build_space(spec, gpu, choices=choices)
        except ValueError as err:
            log.warning("skipping %s: %s", spec, err)
            continue
        tasks += [Task(spec, config, ()) for config in space.configs]
        tasks += [Task(spec, item.config, item.reasons) for item in space.rejected]
    return tasks


def collect(
    tasks: Sequence[Task], out: str | Path, measure: MeasureFn, gpu: GPUSpec, *, gpu_name: str | None = None,
    interpreted: bool = False, compiler_features: bool = False, limit: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> CollectSummary:  # fmt: skip
    """Measure each task not yet in `out` (at most `limit`), appending records; `on_step(done, total)` reports
    progress. `gpu` sets the constraints and analytic features; `gpu_name` (default gpu.name) labels the records."""
    known = {r.key for r in iter_records(out)} if Path(out).exists() else set()
    versions = tool_versions(interpreted)
    missing = [task for task in tasks if _task_key(task, gpu_name or gpu.name, interpreted) not in known]
    todo = missing[:limit] if limit is not None else missing
    pending: list[MeasurementRecord] = []
    by_status: dict[str, int] = {}
    for done, task in enumerate(todo, 1):
        if task.rejected:
            measurement = Measurement("infeasible", error="rejected: " + "; ".join(task.rejected))
        else:
            measurement = measure(task.spec, task.config)
        features = record_features(task.spec, task.config, gpu, compiler_features)
        record = make_record(task.spec, task.config, gpu_name or gpu.name, measurement, versions=versions,
                             features=features, interpreted=interpreted)  # fmt: skip
        pending.append(record)
        by_status[record.status] = by_status.get(record.status, 0) + 1
        if len(pending) >= FLUSH_EVERY:
            write_records(out, pending)
            pending.clear()
        if on_step is not None:
            on_step(done, len(todo))
    write_records(out, pending)
    return CollectSummary(len(tasks), len(tasks) - len(missing), len(todo), by_status)


def _task_key(task: Task, gpu_name: str, interpreted: bool) -> str:
    probe = make_record(task.spec, task.config, gpu_name, Measurement("error"), versions={}, features={},
                        interpreted=interpreted)  # fmt: skip
    return probe.key


# ------------------------------------------------------------------------------------------- interpreter timing
def interpreter_measure(spec: Spec, config: TileConfig, repeats: int = 3) -> Measurement:
    """Wall time of the attention forward kernel under the Triton interpreter (CPU), output checked against the
    reference. Plain attention only (no mask, ALiBi, RoPE or dropout). Not GPU truth: tests only."""
    import torch

    from tilefuse.autotune.measure import TOLERANCE
    from tilefuse.codegen import reference as ref

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("interpreter_measure needs TRITON_INTERPRET=1 set before the kernels are imported")
    if not isinstance(spec, AttentionSpec) or spec.mask != "none" or spec.alibi or spec.rope or spec.dropout_p:
        return Measurement("error", error="interpreter collection covers plain attention only")
    from tilefuse.codegen.attention_fwd import attention_forward_triton

    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, spec.dtype.removeprefix("torch."))
    b, hq, hk, nq, nk = (int(d or 1) for d in (spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len))
    shapes = ((b, hq, nq, spec.head_dim), (b, hk, nk, spec.head_dim), (b, hk, nk, spec.v_head_dim))
    q, k, v = (torch.randn(*shape, generator=gen).to(dtype) for shape in shapes)
    inputs = ref.AttnInputs(q, k, v)
    flags = ref.AttnFlags(spec.scale, spec.causal, spec.align == "bottom_right", spec.window or 0, spec.softcap or 0.0)
    knobs = {"block_m": config.block_m, "block_n": config.block_n, "num_warps": config.num_warps,
             "num_stages": config.num_stages}  # fmt: skip
    try:
        out = attention_forward_triton(inputs, flags, **knobs)[0].float()
    except Exception as err:
        return Measurement("compile-fail", error=f"{type(err).__name__}: {err}"[:500])
    expected = ref.attention_forward(inputs, flags).float()
    atol, rtol = TOLERANCE.get(spec.dtype.removeprefix("torch."), (1e-2, 1e-2))
    if float(((out - expected).abs() - rtol * expected.abs()).max()) > atol:
        return Measurement("wrong-output", error="interpreter output differs from the reference")
    times_us = []
    for _ in range(repeats):
        start = time.perf_counter()
        attention_forward_triton(inputs, flags, **knobs)
        times_us.append((time.perf_counter() - start) * 1e6)
    quartiles = statistics.quantiles(times_us, n=5, method="inclusive") if repeats > 1 else times_us * 4
    return Measurement.ok(statistics.median(times_us), quartiles[0], quartiles[3])
