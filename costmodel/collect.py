"""Collect measurement records: every Spec of a shape grid × every config of its search space, measured on the GPU
(costmodel.measure: output checked, do_bench quantiles) or refused by the constraints, appended to a record file.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilefuse.codegen.families import KERNEL_FAMILIES, kernel_family, plan_for
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.costmodel.measure import Measurement
from tilefuse.specs import AttentionSpec, Spec

from .analytic import predict
from .grids import SHAPE_GRIDS, TINY_CHOICES, shape_grid
from .hardware import GPUSpec
from .records import MeasurementRecord, iter_records, make_record, write_records
from .space import build_space

__all__ = ["FAMILIES", "SHAPE_GRIDS", "TINY_CHOICES", "CollectSummary", "Task", "collect", "interpreter_measure",
           "plan_tasks", "record_features", "shape_grid"]  # fmt: skip

log = logging.getLogger("tilefuse.costmodel")

FAMILIES = KERNEL_FAMILIES  # every kernel family takes a tile config (codegen/families)
FLUSH_EVERY = 32  # records per gzip member: an interrupted run loses at most this many measurements
MeasureFn = Callable[[Spec, TileConfig, str], Measurement]  # (spec, config, kernel family)


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


def record_features(
    spec: Spec, config: TileConfig, gpu: GPUSpec, compiler: bool, kind: str | None = None
) -> dict[str, Any]:
    """The analytic model's breakdown (always) and the compiler's facts for `gpu.arch` (when `compiler`) of `config`
    launched by kernel family `kind` (default: the Spec's forward family)."""
    plan = plan_for(spec, config, kind)
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
    kind: str = "attention"  # the kernel family (codegen.families.KERNEL_FAMILIES)


@dataclass(frozen=True)
class CollectSummary:
    planned: int
    skipped: int  # already in the file
    written: int
    by_status: dict[str, int]


def plan_tasks(
    specs: Sequence[Spec], gpu: GPUSpec, choices: Mapping[str, Sequence[int]] | None = None, *, kind: str | None = None
) -> list[Task]:
    """Every (Spec, config) of kernel family `kind`'s search space (default: each Spec's forward family): the
    feasible ones to measure and the rejected ones, recorded as data."""
    tasks: list[Task] = []
    for spec in specs:
        try:
            space = build_space(spec, gpu, kind=kind, choices=choices)
        except ValueError as err:
            log.warning("skipping %s: %s", spec, err)
            continue
        tasks += [Task(spec, config, (), space.kind) for config in space.configs]
        tasks += [Task(spec, item.config, item.reasons, space.kind) for item in space.rejected]
    return tasks


def collect(
    tasks: Sequence[Task], out: str | Path, measure: MeasureFn, gpu: GPUSpec, *, gpu_name: str | None = None,
    interpreted: bool = False, compiler_features: bool = False, limit: int | None = None,
    on_step: Callable[[int, int], None] | None = None, warm: Callable[[Sequence[Task]], None] | None = None,
) -> CollectSummary:  # fmt: skip
    """Measure each task not yet in `out` (at most `limit`), appending records; `on_step(done, total)` reports
    progress. `gpu` sets the constraints and analytic features; `gpu_name` (default gpu.name) labels the records.
    `warm` (e.g. `warm_kernels`) first runs over the tasks about to be measured, to compile them ahead."""
    known = {r.key for r in iter_records(out)} if Path(out).exists() else set()
    versions = tool_versions(interpreted)
    missing = [task for task in tasks if _task_key(task, gpu_name or gpu.name, interpreted) not in known]
    todo = missing[:limit] if limit is not None else missing
    if warm is not None:
        warm([task for task in todo if not task.rejected])
    pending: list[MeasurementRecord] = []
    by_status: dict[str, int] = {}
    for done, task in enumerate(todo, 1):
        if task.rejected:
            measurement = Measurement("infeasible", error="rejected: " + "; ".join(task.rejected))
        else:
            measurement = measure(task.spec, task.config, task.kind)
        features = record_features(task.spec, task.config, gpu, compiler_features, task.kind)
        record = make_record(task.spec, task.config, gpu_name or gpu.name, measurement, versions=versions,
                             features=features, interpreted=interpreted, family=task.kind)  # fmt: skip
        pending.append(record)
        by_status[record.status] = by_status.get(record.status, 0) + 1
        if len(pending) >= FLUSH_EVERY:
            write_records(out, pending)
            pending.clear()
        if on_step is not None:
            on_step(done, len(todo))
    write_records(out, pending)
    return CollectSummary(len(tasks), len(tasks) - len(missing), len(todo), by_status)


def _launch_once(tasks: Sequence[Task], device: str) -> int:
    """Launch each task's config once, untimed (worker of `warm_kernels`); returns how many launched cleanly."""
    from .cases import measure_case

    def untimed(run: Callable[[], object]) -> tuple[float, float, float]:
        return 1.0, 1.0, 1.0

    launched = 0
    for task in tasks:
        launched += measure_case(task.spec, task.config, task.kind, device, untimed).status == "ok"
    return launched


def warm_kernels(tasks: Sequence[Task], jobs: int, device: str = "cuda") -> int:
    """Compile the tasks' kernels in `jobs` worker processes (each launches its share once, on `device`), so the
    timed pass finds every kernel in Triton's on-disk cache and only measures. Compiling takes about a second per
    config and one process uses one CPU core; measuring needs the GPU to itself, so it stays sequential. Tasks of
    one Spec stay together up to a fair share (each worker builds a Spec's inputs and reference once). Returns how
    many launched cleanly; a worker that fails only costs the warm-up (the timed pass compiles what is missing)."""
    import concurrent.futures
    import multiprocessing

    by_spec: dict[tuple[Spec, str], list[Task]] = {}
    for task in tasks:
        by_spec.setdefault((task.spec, task.kind), []).append(task)
    jobs = max(1, jobs)
    piece = max(1, -(-len(tasks) // jobs))  # a Spec with more configs than a fair share is split (one case each)
    pieces = [group[i : i + piece] for group in by_spec.values() for i in range(0, len(group), piece)]
    shares: list[list[Task]] = [[] for _ in range(jobs)]
    for group in sorted(pieces, key=len, reverse=True):  # largest first onto the lightest share
        min(shares, key=len).extend(group)
    shares = [share for share in shares if share]
    if not shares:
        return 0
    context = multiprocessing.get_context("spawn")  # CUDA cannot be re-initialized in a forked child
    launched = 0
    with concurrent.futures.ProcessPoolExecutor(len(shares), mp_context=context) as pool:
        futures = [pool.submit(_launch_once, share, device) for share in shares]
        for future in concurrent.futures.as_completed(futures):
            try:
                launched += future.result()
            except Exception as err:  # a crashed worker (e.g. killed for memory) loses only its warm-up
                log.warning("warm-up worker failed: %s: %s", type(err).__name__, err)
    return launched


def _task_key(task: Task, gpu_name: str, interpreted: bool) -> str:
    probe = make_record(task.spec, task.config, gpu_name, Measurement("error"), versions={}, features={},
                        interpreted=interpreted, family=task.kind)  # fmt: skip
    return probe.key


# ------------------------------------------------------------------------------------------- interpreter timing
def _wall_times(repeats: int) -> Callable[[Callable[[], object]], tuple[float, float, float]]:
    def timer(run: Callable[[], object]) -> tuple[float, float, float]:
        times_us = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times_us.append((time.perf_counter() - start) * 1e6)
        quartiles = statistics.quantiles(times_us, n=5, method="inclusive") if repeats > 1 else times_us * 4
        return statistics.median(times_us), quartiles[0], quartiles[3]

    return timer


def interpreter_measure(spec: Spec, config: TileConfig, kind: str | None = None, repeats: int = 3) -> Measurement:
    """Wall time of kernel family `kind` (default: the Spec's forward family) under the Triton interpreter (CPU),
    output checked against the reference (`costmodel.cases`, as on the GPU). Attention only without mask, ALiBi,
    RoPE or dropout. Not GPU truth: tests only."""
    from .cases import measure_case

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("interpreter_measure needs TRITON_INTERPRET=1 set before the kernels are imported")
    if isinstance(spec, AttentionSpec) and (spec.mask != "none" or spec.alibi or spec.rope or spec.dropout_p):
        return Measurement("error", error="interpreter collection covers plain attention only")
    return measure_case(spec, config, kind or kernel_family(spec), "cpu", _wall_times(repeats))
