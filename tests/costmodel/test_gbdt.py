"""The gradient-boosted (LambdaRank) ranker: graded relevance, ranking quality per family on synthetic labels
(test data, never shipped), JSON round trip of LightGBM's text boosters, and refusal of foreign files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from test_learned_families import SPECS, _dataset  # sibling test module: the same synthetic data

from tilefuse.costmodel.evaluate import evaluation_report
from tilefuse.costmodel.gbdt import MAX_RELEVANCE, GBDTModel, GBDTSettings, relevance, train_gbdt
from tilefuse.costmodel.records import MeasurementRecord


@pytest.fixture(scope="module")
def records() -> list[MeasurementRecord]:
    return _dataset()


@pytest.fixture(scope="module")
def model(records: list[MeasurementRecord]) -> GBDTModel:
    return train_gbdt(records, GBDTSettings(num_trees=100))


def test_relevance_grades_by_slowdown() -> None:
    grades = relevance(np.array([2.0, 1.0, 1.04, 1.06, 100.0]))
    assert grades.tolist() == [MAX_RELEVANCE - 14, MAX_RELEVANCE, MAX_RELEVANCE, MAX_RELEVANCE - 1, 0]


def test_ranks_every_family(records: list[MeasurementRecord], model: GBDTModel) -> None:
    report = evaluation_report(records, model)["all"]
    assert set(report["families"]) == set(SPECS)
    for family, metrics in report["families"].items():
        assert metrics["learned"]["pairwise_accuracy"] > 0.8, (family, metrics["learned"])
        assert metrics["learned"]["kendall_tau"] > 0.6, (family, metrics["learned"])


def test_feasibility_head_ranks_failed_configs_last(records: list[MeasurementRecord]) -> None:
    # Mark every config with 2 warps as failed: the classifier must learn it from the knob.
    failed = [dataclasses.replace(r, status="error", latency_ms={}) if r.config["num_warps"] == 2 else r
              for r in records]  # fmt: skip
    model = train_gbdt(failed, GBDTSettings(num_trees=60))
    assert model.feasibility is not None
    scores = model.rank_scores(failed)
    two_warps = np.array([r.config["num_warps"] == 2 for r in failed])
    assert np.isinf(scores[two_warps]).mean() > 0.9 and np.isfinite(scores[~two_warps]).mean() > 0.9


def test_json_round_trip_and_foreign_files(records: list[MeasurementRecord], model: GBDTModel, tmp_path: Path) -> None:
    path = tmp_path / "gbdt.json"
    model.save(path)
    loaded = GBDTModel.load(path)
    np.testing.assert_allclose(loaded.predict(records)[0], model.predict(records)[0])
    data = json.loads(path.read_text())
    with pytest.raises(ValueError, match="version"):
        GBDTModel.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="schema"):
        GBDTModel.from_dict({**data, "feature_schema": ["x"]})
    with pytest.raises(ValueError, match="not a tilefuse gbdt"):
        GBDTModel.from_dict({"format": "tilefuse-costmodel-mlp"})
