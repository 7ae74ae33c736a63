"""The gradient-boosted ranker: LightGBM's LambdaRank objective over the same feature schema as the MLP
(`learned.record_vector`), with graded relevance from each config's slowdown against its group's best, plus a
binary feasibility classifier. Saved as JSON whose boosters are LightGBM's own text model format (parsed, never
unpickled); needs the `lightgbm` package to train or load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .learned import FEATURE_SCHEMA, group_indices, record_vector
from .records import MeasurementRecord

MODEL_FORMAT = "tilefuse-costmodel-gbdt"
MODEL_VERSION = 1
MAX_RELEVANCE = 30  # LightGBM's default label_gain covers grades 0..30
RELEVANCE_STEP = 1.05  # one grade per 5% slowdown against the group's best


def relevance(latencies_ms: np.ndarray) -> np.ndarray:
    """Grades of one group's measured configs: MAX_RELEVANCE for the best, one less per 5% slower, floored at 0."""
    slowdown = np.log(latencies_ms / latencies_ms.min()) / math.log(RELEVANCE_STEP)
    return np.clip(MAX_RELEVANCE - np.floor(slowdown + 1e-9), 0, MAX_RELEVANCE).astype(np.int32)


def _lightgbm() -> Any:
    try:
        import lightgbm
    except ImportError as err:
        raise ImportError("the gbdt cost model needs LightGBM: pip install lightgbm") from err
    return lightgbm


@dataclass(frozen=True)
class GBDTSettings:
    num_trees: int = 300
    num_leaves: int = 31
    learning_rate: float = 0.05
    min_data_in_leaf: int = 5
    seed: int = 0


@dataclass
class GBDTModel:
    """Scores records: lower `score` = predicted faster; `feasible_prob` < 0.5 ranks a config last."""

    ranker: Any  # lightgbm.Booster
    feasibility: Any | None  # lightgbm.Booster, or None when every training record ran (all feasible)
    trained_on: dict[str, Any] = field(default_factory=dict)
    schema: tuple[str, ...] = FEATURE_SCHEMA

    def predict(self, records: Sequence[MeasurementRecord]) -> tuple[np.ndarray, np.ndarray]:
        """(latency scores, feasibility probabilities) of `records`."""
        if not records:
            return np.zeros(0), np.zeros(0)
        features = np.stack([record_vector(r) for r in records])
        score = -np.asarray(self.ranker.predict(features), dtype=np.float64)  # LambdaRank: higher = better
        if self.feasibility is None:
            return score, np.ones(len(records))
        return score, np.asarray(self.feasibility.predict(features), dtype=np.float64)

    def rank_scores(self, records: Sequence[MeasurementRecord]) -> np.ndarray:
        """Scores to sort by (ascending): predicted-infeasible configs get +inf."""
        score, feasible = self.predict(records)
        return np.where(feasible >= 0.5, score, np.inf)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT, "version": MODEL_VERSION, "feature_schema": list(self.schema),
            "ranker": self.ranker.model_to_string(),
            "feasibility": self.feasibility.model_to_string() if self.feasibility is not None else None,
            "trained_on": self.trained_on,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: object) -> GBDTModel:
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise ValueError(f"not a tilefuse gbdt cost model (expected format {MODEL_FORMAT!r})")
        if data.get("version") != MODEL_VERSION:
            raise ValueError(f"gbdt cost model version {data.get('version')!r}; this tilefuse reads {MODEL_VERSION}")
        if tuple(data.get("feature_schema") or ()) != FEATURE_SCHEMA:
            raise ValueError("cost model feature schema differs from this tilefuse's; retrain it")
        lightgbm = _lightgbm()
        ranker = lightgbm.Booster(model_str=str(data["ranker"]))
        feasibility = data.get("feasibility")
        booster = lightgbm.Booster(model_str=str(feasibility)) if feasibility else None
        return cls(ranker, booster, dict(data.get("trained_on") or {}))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> GBDTModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _ranking_groups(records: Sequence[MeasurementRecord]) -> list[list[int]]:
    """Indices of the ok records of each group that has at least two, in record order."""
    groups = [[i for i in idx if records[i].status == "ok"] for idx in group_indices(records).values()]
    return [g for g in groups if len(g) >= 2]


def train_gbdt(records: Sequence[MeasurementRecord], settings: GBDTSettings | None = None) -> GBDTModel:
    """Fit the LambdaRank ranker on every group with two or more measured configs, and the feasibility classifier
    on all records (when some failed). Deterministic for a given seed (one thread)."""
    lightgbm = _lightgbm()
    settings = settings or GBDTSettings()
    groups = _ranking_groups(records)
    if not groups:
        raise ValueError("train: no group has two ok records to rank")
    order = [i for g in groups for i in g]
    features = np.stack([record_vector(r) for r in records])
    labels = np.concatenate([relevance(np.array([records[i].median_ms for i in g])) for g in groups])
    common = {
        "num_leaves": settings.num_leaves, "learning_rate": settings.learning_rate,
        "min_data_in_leaf": settings.min_data_in_leaf, "seed": settings.seed, "deterministic": True,
        "num_threads": 1, "verbosity": -1,
    }  # fmt: skip
    rank_data = lightgbm.Dataset(features[order], label=labels, group=[len(g) for g in groups])
    ranker = lightgbm.train({**common, "objective": "lambdarank", "lambdarank_truncation_level": 10},
                            rank_data, num_boost_round=settings.num_trees)  # fmt: skip
    ok = np.array([r.status == "ok" for r in records], dtype=np.float64)
    feasibility = None
    if 0 < ok.sum() < len(ok):
        feasibility = lightgbm.train({**common, "objective": "binary"}, lightgbm.Dataset(features, label=ok),
                                     num_boost_round=max(settings.num_trees // 3, 10))  # fmt: skip
    trained_on = {"records": len(records), "groups": len(group_indices(records)),
                  "specs": sorted({r.spec_json for r in records}), "gpus": sorted({r.gpu for r in records}),
                  "settings": settings.__dict__}  # fmt: skip
    return GBDTModel(ranker, feasibility, trained_on)
