"""Tune one site: database hit → else the cost model's ranking → (mode "measure") an Optuna study seeded with the
model's top-k, TPE proposals screened by the model, measured, stopped on budget or no improvement, close calls
re-measured → the record goes into the database.

Modes: "model" (cost model only; the default without a GPU), "measure" (GPU search), "exhaustive" (measure every
feasible config: ground truth). Every kernel family tunes alike (`kind`: the forward, decode or backward attention
kernel, the norm forward or backward, RoPE); the cost model screens each config with that family's TiledPlan. The
measure function is injectable (`measure=`, called as `measure(spec, config)`), so the search runs anywhere.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from tilefuse.codegen.families import default_config, kernel_family, plan_for
from tilefuse.codegen.tile_config import TileConfig, config_to_dict
from tilefuse.costmodel.analytic import predict
from tilefuse.costmodel.hardware import GPUSpec
from tilefuse.costmodel.measure import Measurement
from tilefuse.costmodel.space import SearchSpace, build_space, infeasible_reasons
from tilefuse.specs import Spec

from .db import TuningDB
from .keys import TuningKey, tuning_key
from .records import SOURCE_RANK, Trial, TuningRecord
from .study import MeasureFn, SearchJob, grace_period_s, make_storage, run_worker, safe_measure, settle, trials_of

log = logging.getLogger("tilefuse.autotune")

MODES = ("model", "measure", "exhaustive")
PREDICTED_TRIALS_KEPT = 8  # mode "model" stores the model's top configs as predicted trials


@dataclass(frozen=True)
class TuneSettings:
    """How to tune. `budget`: measured configs per site; `patience`: stop after this many measurements without a
    0.5% improvement (default budget // 2, at least 4); `top_k`: cost-model picks measured first; `workers` > 1
    runs that many processes on one study in `study_url` (the tuning database's URL by default); `compile_jobs` > 1
    compiles the configs the search is likely to measure (the cost model's first 2·budget, every config when
    exhaustive) in that many processes before the GPU measures them one by one."""

    mode: str = "model"
    budget: int = 16
    patience: int | None = None
    top_k: int = 4
    seed: int = 0
    workers: int = 1
    remeasure: int = 2
    close_margin: float = 0.03
    force: bool = False
    study_url: str | None = None
    measure_target: str = "gpu"  # for worker processes: "gpu" or "package.module:function"
    heartbeat_interval: int = 10
    compile_jobs: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {list(MODES)}")
        for name in ("budget", "top_k", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.workers > 1 and self.mode != "measure":
            raise ValueError(f"workers={self.workers} needs mode 'measure', got {self.mode!r}")

    @property
    def stop_patience(self) -> int:
        return self.patience if self.patience is not None else max(4, self.budget // 2)


@dataclass(frozen=True)
class TuneOutcome:
    """One site's kernel family's result (`kind`): the record (from the database on a hit), the default config and
    its latency (measured in the measuring modes, predicted in mode "model"), and the best config's predicted
    latency."""

    spec: Spec
    key: TuningKey
    record: TuningRecord
    hit: bool
    default: TileConfig
    default_latency_us: float | None
    predicted_us: float | None
    space_size: int = 0
    rejected: int = 0
    notes: list[str] = field(default_factory=list)
    kind: str = "attention"

    @property
    def speedup(self) -> float | None:
        best = self.record.best_latency_us
        if not best or self.default_latency_us is None or not math.isfinite(self.default_latency_us):
            return None
        return self.default_latency_us / best


def resolve_measure(target: str, kind: str = "attention") -> MeasureFn:
    """ "gpu" → the CUDA measurement of kernel family `kind`; "package.module:function" → that function (called as
    `fn(spec, config)`)."""
    if target == "gpu":
        from tilefuse.costmodel.measure import gpu_measure

        return functools.partial(gpu_measure, kind=kind)
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"measure target {target!r}: expected 'gpu' or 'package.module:function'")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"measure target {target!r}: {name!r} is not a callable in {module!r}")
    return fn


def predicted_latencies(
    spec: Spec, configs: Sequence[TileConfig], gpu: GPUSpec, kind: str | None = None
) -> dict[TileConfig, float]:
    """The cost model's latency (µs) per config launched by kernel family `kind` (default: the Spec's forward
    family), in ranking order (fastest first, ties in input order; infeasible ones last at inf). Where a learned
    model ranks for `gpu` (`costmodel.ranker.model_for`), it decides the order and feasibility; its scores have no
    unit, so the k-th config in its order gets the k-th smallest analytic latency (values stay in µs)."""
    from tilefuse.costmodel.ranker import learned_scores, model_for

    latency = {config: predict(plan_for(spec, config, kind), gpu).latency_us for config in configs}
    model = model_for(gpu)
    if model is not None and configs:
        scores = learned_scores(model, spec, configs, gpu, kind or kernel_family(spec))
        order = sorted(range(len(configs)), key=lambda i: scores[i])
        values = sorted(latency.values())
        latency = {configs[i]: (values[rank] if math.isfinite(scores[i]) else math.inf)
                   for rank, i in enumerate(order)}  # fmt: skip
    return dict(sorted(latency.items(), key=lambda item: item[1]))


def _db_hit(
    db: TuningDB | None, key: TuningKey, spec: Spec, gpu: GPUSpec, settings: TuneSettings, kind: str
) -> TuningRecord | None:
    if db is None or settings.force:
        return None
    record = db.get(key)
    if record is None or record.best is None or SOURCE_RANK[record.source] < SOURCE_RANK[settings.mode]:
        return None
    reasons = infeasible_reasons(spec, record.best, gpu, kind=kind)
    if reasons:
        log.warning("tuning db: stored config %s for %s is infeasible here (%s); retuning", record.best,
                    key.describe(), "; ".join(reasons))  # fmt: skip
        return None
    return record


def tune_spec(
    spec: Spec,
    gpu: GPUSpec,
    settings: TuneSettings | None = None,
    *,
    kind: str | None = None,
    db: TuningDB | None = None,
    measure: MeasureFn | None = None,
) -> TuneOutcome:
    """Tune kernel family `kind` (default: the Spec's forward family, `codegen.families.kernel_family`) of `spec` for
    `gpu` and record the result in `db` (when given). `measure(spec, config)` replaces the GPU measurement of that
    family. Raises ValueError for a Spec with dynamic dims or a family the Spec does not launch, and RuntimeError for a
    measuring mode without a GPU or a `measure` function."""
    settings = settings or TuneSettings()
    kind = kind or kernel_family(spec)
    key = tuning_key(spec, gpu.arch, kind=kind)
    default = default_config(spec, kind)
    default_predicted = predict(plan_for(spec, default, kind), gpu).latency_us
    hit = _db_hit(db, key, spec, gpu, settings, kind)
    if hit is None and settings.mode != "model" and measure is None and settings.measure_target == "gpu":
        from tilefuse.costmodel.measure import require_cuda

        require_cuda()
    if hit is not None:
        latency = _default_latency(hit, default)
        if latency is None and hit.source == "model":
            latency = default_predicted
        return TuneOutcome(spec, key, hit, True, default, latency, None, kind=kind)
    space = build_space(spec, gpu, kind=kind)
    predicted = predicted_latencies(spec, space.configs, gpu, kind)
    if settings.mode != "model" and space.tunable and measure is None:
        measure = resolve_measure(settings.measure_target, kind)
        if settings.measure_target == "gpu" and settings.compile_jobs > 1:
            warm_candidates(spec, kind, predicted, settings, "cuda")
    if settings.mode == "model" or not space.tunable or measure is None:
        record = _model_record(key, spec, predicted, "model")
    elif settings.mode == "exhaustive":
        record = _measured_record(key, spec, _exhaustive(spec, space, predicted, measure), "exhaustive")
    else:
        record = _measured_record(key, spec, optuna_search(spec, key, space, predicted, measure, settings, db),
                                  "measure")  # fmt: skip
    if record.source != "model" and measure is not None:
        record = _confirm_close_calls(record, spec, measure, settings)
    if db is not None:
        db.record(record)
    default_latency = _default_latency(record, default)
    if default_latency is None:
        measured = record.source != "model" and measure is not None
        default_latency = safe_measure(measure, spec, default).median_us if measure and measured else default_predicted
    best_predicted = predicted.get(record.best) if record.best is not None else None
    return TuneOutcome(spec, key, record, False, default, default_latency, best_predicted, len(space.configs),
                       len(space.rejected), kind=kind)  # fmt: skip


def warm_candidates(
    spec: Spec, kind: str, predicted: dict[TileConfig, float], settings: TuneSettings, device: str
) -> int:
    """Compile (by launching once, in `settings.compile_jobs` processes) the configs the search will most likely
    measure, so the timed loop finds them in Triton's cache; returns how many launched cleanly."""
    from tilefuse.costmodel.collect import Task, warm_kernels

    ranked = [config for config, latency in predicted.items() if math.isfinite(latency)]
    count = len(ranked) if settings.mode == "exhaustive" else max(2 * settings.budget, settings.top_k)
    tasks = [Task(spec, config, (), kind) for config in ranked[:count]]
    start = time.perf_counter()
    launched = warm_kernels(tasks, settings.compile_jobs, device)
    log.info("compiled %d of %d likely configs in %d processes in %.1f s", launched, len(tasks),
             settings.compile_jobs, time.perf_counter() - start)  # fmt: skip
    return launched


def _default_latency(record: TuningRecord, default: TileConfig) -> float | None:
    """The default config's latency from the record's trials (measured, or predicted in mode "model")."""
    for trial in record.trials:
        if trial.config == default and trial.status == "ok":
            return trial.median_us
        if trial.config == default and trial.status == "predicted":
            return trial.predicted_us
    return None


def _model_record(key: TuningKey, spec: Spec, predicted: dict[TileConfig, float], source: str) -> TuningRecord:
    ranked = list(predicted.items())
    best, latency = ranked[0]
    trials = tuple(Trial(c, "predicted", predicted_us=p) for c, p in ranked[:PREDICTED_TRIALS_KEPT])
    return TuningRecord(key, best, latency if math.isfinite(latency) else None, source, spec.to_dict(), trials)


def _measured_record(key: TuningKey, spec: Spec, trials: list[Trial], source: str) -> TuningRecord:
    ok = [t for t in trials if t.status == "ok"]
    if not ok:
        log.warning("tuning %s: every measured config failed; no best config recorded", key.describe())
        return TuningRecord(key, None, None, source, spec.to_dict(), tuple(trials))
    best = min(ok, key=lambda t: t.median_us)
    return TuningRecord(key, best.config, best.median_us, source, spec.to_dict(), tuple(trials))


def _exhaustive(spec: Spec, space: SearchSpace, predicted: dict[TileConfig, float], measure: MeasureFn) -> list[Trial]:
    trials = []
    for config in predicted:  # fastest-predicted first, so an interrupted run still has the likely winners
        result = safe_measure(measure, spec, config)
        trials.append(Trial(config, result.status, result.latency_us, predicted[config], result.error))
    return trials


def optuna_search(
    spec: Spec, key: TuningKey, space: SearchSpace, predicted: dict[TileConfig, float], measure: MeasureFn,
    settings: TuneSettings, db: TuningDB | None,
) -> list[Trial]:  # fmt: skip
    # The default config first (tuning must never lose to it unseen), then the cost model's top-k.
    default = default_config(spec, space.kind)
    firsts = ([default] if default in space else []) + [c for c in predicted if c != default][: settings.top_k]
    shared = settings.workers > 1
    # One process: enqueue them. Shared: the sampler proposes them first instead, because popping an enqueued
    # trial is not atomic on SQLite (two workers could run one trial); duplicates then resolve by trial number.
    job = SearchJob(spec, dict(space.choices), tuple(predicted), predicted, settings.budget,
                    settings.stop_patience, settings.seed, firsts=tuple(firsts) if shared else (),
                    kind=space.kind)  # fmt: skip
    url = settings.study_url or (db.url if db is not None and shared else None)
    if shared and url is None:
        raise ValueError("workers > 1 need shared study storage: pass a database URL (db= or study_url=)")
    storage = make_storage(url, settings.heartbeat_interval)
    name = f"tilefuse-{key.digest[:16]}-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=storage, sampler=job.sampler(settings.seed))
    for config in firsts if not shared else ():
        study.enqueue_trial(config_to_dict(config))
    if shared:
        from .worker import launch_workers

        assert url is not None
        launch_workers(job, url, name, settings.workers, settings.measure_target, settings.heartbeat_interval)
        study = optuna.load_study(study_name=name, storage=storage, sampler=job.sampler(settings.seed))
        running = settle(study, timeout_s=grace_period_s(settings.heartbeat_interval) + 2 * settings.heartbeat_interval)
        if running:
            log.warning("tuning %s: %d trials still running after the workers stopped", key.describe(), running)
    run_worker(study, job, measure, worker="main")  # alone, or finishing what dead workers left
    return trials_of(study, predicted)


def _confirm_close_calls(record: TuningRecord, spec: Spec, measure: MeasureFn, settings: TuneSettings) -> TuningRecord:
    """Re-measure every config whose median is within `close_margin` of the best, and keep the median of all its
    medians: one noisy run must not crown a config."""
    ok = [t for t in record.trials if t.status == "ok"]
    if len(ok) < 2 or settings.remeasure < 1:
        return record
    best = min(t.median_us for t in ok)
    close = [t for t in ok if t.median_us <= best * (1 + settings.close_margin)]
    if len(close) < 2:
        return record
    medians: dict[TileConfig, list[float]] = {t.config: [t.median_us] for t in close}
    for _ in range(settings.remeasure):
        for config in medians:
            result: Measurement = safe_measure(measure, spec, config)
            if result.status == "ok":
                medians[config].append(result.median_us)
    winner = min(medians, key=lambda c: statistics.median(medians[c]))
    return TuningRecord(record.key, winner, statistics.median(medians[winner]), record.source, record.spec,
                        record.trials)  # fmt: skip


def summary_row(outcome: TuneOutcome) -> dict[str, Any]:
    """The JSON row of one tuned site."""
    record = outcome.record
    return {
        "kernel": outcome.kind, "key": outcome.key.describe(), "key_digest": outcome.key.digest, "hit": outcome.hit,
        "source": record.source, "best": config_to_dict(record.best) if record.best else None,
        "best_latency_us": record.best_latency_us, "best_predicted_us": outcome.predicted_us,
        "default": config_to_dict(outcome.default), "default_latency_us": outcome.default_latency_us,
        "speedup_over_default": outcome.speedup, "feasible_configs": outcome.space_size,
        "rejected_configs": outcome.rejected,
        "trials": [t.to_dict() for t in record.trials],
    }  # fmt: skip
