"""Choosing the learned model that ranks configs: a model file of either kind, the one shipped per GPU, the
$TILEFUSE_COST_MODEL override, and an unusable file falling back to the analytic model with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from test_learned_families import _dataset  # sibling test module: synthetic multi-family records

from tilefuse.costmodel import ranker
from tilefuse.costmodel.gbdt import GBDTModel, GBDTSettings, train_gbdt
from tilefuse.costmodel.hardware import get_gpu
from tilefuse.costmodel.learned import LearnedModel, TrainSettings, train
from tilefuse.costmodel.space import build_space
from tilefuse.specs import NormSpec

H100 = get_gpu("h100")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    records = _dataset()
    paths = {"gbdt": folder / "gbdt.json", "mlp": folder / "mlp.json"}
    train_gbdt(records, GBDTSettings(num_trees=40)).save(paths["gbdt"])
    train(records, TrainSettings(epochs=20)).save(paths["mlp"])
    return paths


def test_load_model_tells_the_kinds_apart(saved_models: dict[str, Path], tmp_path: Path) -> None:
    assert isinstance(ranker.load_model(saved_models["gbdt"]), GBDTModel)
    assert isinstance(ranker.load_model(saved_models["mlp"]), LearnedModel)
    (tmp_path / "other.json").write_text('{"format": "xgboost"}')
    with pytest.raises(ValueError, match="not a tilefuse cost model"):
        ranker.load_model(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        ranker.load_model(tmp_path / "broken.json")


def test_model_for_prefers_the_override_then_the_shipped_file(
    saved_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ranker, "SHIPPED_DIR", tmp_path)
    monkeypatch.delenv(ranker.MODEL_ENV, raising=False)
    assert ranker.gpu_slug(H100.name) == "h100-sxm"
    assert ranker.model_for(H100) is None  # nothing shipped: the analytic model ranks
    (tmp_path / "h100-sxm.json").write_bytes(saved_models["gbdt"].read_bytes())
    assert isinstance(ranker.model_for(H100), GBDTModel)
    monkeypatch.setenv(ranker.MODEL_ENV, str(saved_models["mlp"]))
    assert isinstance(ranker.model_for(H100), LearnedModel)
    monkeypatch.setenv(ranker.MODEL_ENV, "analytic")
    assert ranker.model_for(H100) is None
    (tmp_path / "bad.json").write_text('{"format": "tilefuse-costmodel-gbdt", "version": 0}')
    monkeypatch.setenv(ranker.MODEL_ENV, str(tmp_path / "bad.json"))
    with caplog.at_level(logging.WARNING, logger="tilefuse.costmodel"):
        assert ranker.model_for(H100) is None
    assert "unusable" in caplog.text


def test_learned_scores_rank_candidate_configs(saved_models: dict[str, Path]) -> None:
    model = ranker.load_model(saved_models["gbdt"])
    spec = NormSpec("rmsnorm", 8192, (4096, 8192), "bfloat16", 1e-6, out_dtype="bfloat16")
    configs = build_space(spec, H100, kind="norm").configs
    scores = ranker.learned_scores(model, spec, configs, H100, "norm")
    assert scores.shape == (len(configs),) and np.isfinite(scores).all()
    # The synthetic labels make 16 warps best for rows this wide; the trained ranker should put it first.
    assert configs[int(np.argmin(scores))].num_warps == 16


def test_the_autotuner_ranks_with_the_learned_model_when_one_is_there(
    saved_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tilefuse.autotune.search import TuneSettings, predicted_latencies, tune_spec

    spec = NormSpec("rmsnorm", 8192, (4096, 8192), "bfloat16", 1e-6, out_dtype="bfloat16")
    configs = build_space(spec, H100, kind="norm").configs
    monkeypatch.setenv(ranker.MODEL_ENV, "analytic")
    analytic = predicted_latencies(spec, configs, H100, "norm")
    monkeypatch.setenv(ranker.MODEL_ENV, str(saved_models["gbdt"]))
    learned = predicted_latencies(spec, configs, H100, "norm")
    assert sorted(learned.values()) == sorted(analytic.values())  # the same µs values, in the model's order
    assert next(iter(analytic)).num_warps != 16 and next(iter(learned)).num_warps == 16
    outcome = tune_spec(spec, H100, TuneSettings(mode="model"), kind="norm")
    assert outcome.record.best is not None and outcome.record.best.num_warps == 16
