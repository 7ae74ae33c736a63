"""The search strategy on a synthetic latency function (no GPU): db hit, cost-model order, Optuna search with
screening, failures recorded, stopping rules, exhaustive ground truth."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import optuna
import pytest
from _synthetic import OPTIMUM, synthetic_cost, synthetic_latency

from tilefuse.autotune.db import TuningDB
from tilefuse.autotune.keys import tuning_key
from tilefuse.autotune.search import TuneSettings, predicted_latencies, resolve_measure, summary_row, tune_spec
from tilefuse.codegen.families import default_config, plan_for
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.costmodel.analytic import predict
from tilefuse.costmodel.hardware import get_gpu
from tilefuse.costmodel.measure import Measurement
from tilefuse.costmodel.space import build_space
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

H100 = get_gpu("h100")
SPEC = AttentionSpec(2, 8, 8, 1024, 1024, 64, 64, "bfloat16", 0.125, causal=True)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_model_mode_takes_the_cost_models_best_and_stores_it(tmp_path: Path) -> None:
    db = TuningDB(tmp_path / "t.sqlite")
    outcome = tune_spec(SPEC, H100, TuneSettings(mode="model"), db=db)
    predicted = predicted_latencies(SPEC, build_space(SPEC, H100).configs, H100)
    assert outcome.record.best == next(iter(predicted)) and outcome.record.source == "model"
    assert all(t.status == "predicted" for t in outcome.record.trials)
    assert outcome.default == default_config(SPEC) and outcome.speedup is not None and outcome.speedup >= 1.0
    again = tune_spec(SPEC, H100, TuneSettings(mode="model"), db=db)
    assert again.hit and again.record.best == outcome.record.best


def test_measure_mode_without_a_gpu_says_so() -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        tune_spec(SPEC, H100, TuneSettings(mode="measure"))


def test_measure_search_finds_the_synthetic_optimum_within_budget(tmp_path: Path) -> None:
    calls: list[TileConfig] = []

    def synthetic(spec: Spec, config: TileConfig) -> Measurement:
        calls.append(config)
        return synthetic_latency(spec, config)

    db = TuningDB(tmp_path / "t.sqlite")
    settings = TuneSettings(mode="measure", budget=24, patience=24, seed=1, remeasure=0)
    outcome = tune_spec(SPEC, H100, settings, db=db, measure=synthetic)
    space = build_space(SPEC, H100)
    measured = [t for t in outcome.record.trials if t.status in ("ok", "compile-fail")]
    assert len(measured) == 24 and len({t.config for t in measured}) == 24  # budget spent, nothing measured twice
    assert all(t.config in space for t in measured)  # hard constraints filtered before suggesting
    assert measured[0].config == default_config(SPEC)  # the default first, then the model's picks
    assert outcome.record.best_latency_us <= synthetic_cost(OPTIMUM) * 1.25  # type: ignore[operator]
    assert outcome.record.source == "measure" and outcome.speedup is not None
    assert len(calls) == 24 + 1 - (default_config(SPEC) in {t.config for t in measured})  # + the default's baseline


def test_failed_configs_are_recorded_not_fatal() -> None:
    def flaky(spec: Spec, config: TileConfig) -> Measurement:
        if config.num_stages == 1:
            raise RuntimeError("synthetic: launch failed")
        return synthetic_latency(spec, config)

    outcome = tune_spec(SPEC, H100, TuneSettings(mode="exhaustive"), measure=flaky)
    statuses = {t.status for t in outcome.record.trials}
    assert {"ok", "error", "compile-fail"} <= statuses
    assert all(t.error for t in outcome.record.trials if t.status != "ok")
    assert outcome.record.best is not None and outcome.record.best.num_stages != 1


def test_exhaustive_is_the_ground_truth() -> None:
    outcome = tune_spec(SPEC, H100, TuneSettings(mode="exhaustive"), measure=synthetic_latency)
    space = build_space(SPEC, H100)
    assert len(outcome.record.trials) == len(space.configs)
    ok = [c for c in space.configs if not (c.block_n == 16 and c.num_warps == 2)]
    assert outcome.record.best_latency_us == min(synthetic_cost(c) for c in ok)


def test_search_stops_when_nothing_improves() -> None:
    def flat(spec: Spec, config: TileConfig) -> Measurement:
        return Measurement.ok(5.0)

    outcome = tune_spec(SPEC, H100, TuneSettings(mode="measure", budget=40, patience=4), measure=flat)
    assert len(outcome.record.trials) == 5  # the first sets the best, four more without improvement


def test_every_failure_leaves_no_best() -> None:
    def broken(spec: Spec, config: TileConfig) -> Measurement:
        return Measurement("compile-fail", error="synthetic")

    outcome = tune_spec(SPEC, H100, TuneSettings(mode="measure", budget=6), measure=broken)
    assert outcome.record.best is None and len(outcome.record.trials) == 6


def test_a_measured_db_entry_satisfies_a_model_request(tmp_path: Path) -> None:
    db = TuningDB(tmp_path / "t.sqlite")
    tune_spec(SPEC, H100, TuneSettings(mode="exhaustive"), db=db, measure=synthetic_latency)
    hit = tune_spec(SPEC, H100, TuneSettings(mode="model"), db=db)
    assert hit.hit and hit.record.source == "exhaustive"
    miss = tune_spec(SPEC, H100, TuneSettings(mode="model", force=True), db=db)
    assert not miss.hit


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="mode"):
        TuneSettings(mode="fast")
    with pytest.raises(ValueError, match="budget"):
        TuneSettings(budget=0)
    with pytest.raises(ValueError, match="workers"):
        TuneSettings(mode="model", workers=2)


NORM = NormSpec("rmsnorm", 4096, (2, 128, 4096), "bfloat16", 1e-6)
ROPE = RopeSpec("rotate_half", 128, 128, (2, 32, 128, 128), "bfloat16")


@pytest.mark.parametrize(("spec", "kind"), [(NORM, "norm"), (NORM, "norm_backward"), (ROPE, "rope")])
def test_every_family_tunes_with_its_own_space_and_key(tmp_path: Path, spec: Spec, kind: str) -> None:
    def warps_and_programs(spec: Spec, config: TileConfig) -> Measurement:  # fastest at 8 warps, 132 programs
        value = 5.0 + abs(math.log2(config.num_warps / 8)) + abs(math.log2((config.num_splits or 132) / 132))
        return Measurement.ok(value + abs(math.log2(config.block_m / 16)) if kind == "rope" else value)

    db = TuningDB(tmp_path / "t.sqlite")
    outcome = tune_spec(spec, H100, TuneSettings(mode="exhaustive"), kind=kind, db=db, measure=warps_and_programs)
    space = build_space(spec, H100, kind=kind)
    assert outcome.kind == kind and outcome.key == tuning_key(spec, "sm_90", kind=kind)
    assert {t.config for t in outcome.record.trials} == set(space.configs)
    assert outcome.record.best is not None and outcome.record.best.num_warps == 8
    assert outcome.default == default_config(spec, kind)
    model = tune_spec(spec, H100, TuneSettings(mode="model"), kind=kind, db=db)
    assert model.hit and model.record.source == "exhaustive" and summary_row(model)["kernel"] == kind


def test_backward_and_decode_rank_with_their_own_plans() -> None:
    decode = AttentionSpec(4, 32, 8, 1, 4096, 128, 128, "bfloat16", 0.125, gqa_group=4)
    for spec, kind in ((SPEC, "attention_backward"), (decode, "attention_decode")):
        configs = build_space(spec, H100, kind=kind).configs[:24]
        predicted = predicted_latencies(spec, configs, H100, kind)
        expected = {c: predict(plan_for(spec, c, kind), H100).latency_us for c in configs}
        assert predicted == expected and list(predicted.values()) == sorted(expected.values())


def test_the_gpu_measure_is_bound_to_the_family() -> None:
    measure = resolve_measure("gpu", "norm_backward")
    assert isinstance(measure, functools.partial) and measure.keywords == {"kind": "norm_backward"}
    assert resolve_measure("_synthetic:synthetic_latency", "rope") is synthetic_latency


def test_a_worker_job_keeps_its_family_and_split_counts() -> None:
    from tilefuse.autotune.study import SearchJob, config_of

    space = build_space(NORM, H100, kind="norm_backward")
    predicted = predicted_latencies(NORM, space.configs, H100, "norm_backward")
    job = SearchJob(NORM, dict(space.choices), space.configs, predicted, 8, 4, kind="norm_backward")
    again = SearchJob.from_dict(job.to_dict())
    assert again.kind == "norm_backward" and again.configs == job.configs and again.predicted_us == job.predicted_us
    assert config_of({"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "num_splits": 0}) == TileConfig()
    assert config_of({"block_m": 64}) is None


def test_warm_candidates_compile_the_likely_configs_in_parallel() -> None:
    """The pre-compile of measure mode (run here on the CPU under the interpreter): the cost model's first
    2·budget configs of one Spec are split over the worker processes and each is launched once."""
    from tilefuse.autotune.search import predicted_latencies, warm_candidates
    from tilefuse.specs import NormSpec

    spec = NormSpec("rmsnorm", 64, (8, 64), "float32", 1e-6, out_dtype="float32")
    space = build_space(spec, H100, kind="norm")
    predicted = predicted_latencies(spec, space.configs, H100, "norm")
    settings = TuneSettings(mode="measure", budget=2, compile_jobs=2)
    assert warm_candidates(spec, "norm", predicted, settings, "cpu") == 4  # 2·budget configs, each launched once
