"""The learned ranker: a small MLP over a fixed feature schema (the kernel family one-hot, tile knobs, shape, the
analytic model's breakdown, compiler facts when recorded) trained with a pairwise logistic loss within each group
(same Spec, kernel family and GPU), plus a feasibility head. Saved as JSON (schema, normalization, weights, what it
was trained on) — never pickle; inference is numpy only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilefuse.codegen.families import KERNEL_FAMILIES

from .records import MeasurementRecord

MODEL_FORMAT = "tilefuse-costmodel-mlp"
MODEL_VERSION = 2  # 2: kernel family one-hot, num_splits, norm/RoPE shape features
_ANALYTIC = ("latency_us", "compute_us", "memory_us", "programs", "programs_per_sm", "waves", "wave_efficiency",
             "compute_efficiency", "memory_efficiency", "registers")  # fmt: skip
_COMPILER_COUNTS = ("dots", "loads", "stores", "local_allocs", "async_copies", "exps", "reductions")
FEATURE_SCHEMA: tuple[str, ...] = (
    *(f"family_{name}" for name in KERNEL_FAMILIES),
    "log2_block_m", "log2_block_n", "log2_num_warps", "num_stages", "log2_num_splits", "heuristic_splits",
    "log2_head_dim", "log2_q_len", "log2_kv_len", "log2_batch_heads", "causal", "gqa_group", "itemsize",
    "log2_rows", "log2_width", "rotary_fraction", "layernorm", "has_bias", "residual",
    *(f"analytic_{name}" for name in _ANALYTIC), "analytic_feasible",
    "compiled", "compiled_registers", "compiled_spill_bytes", "compiled_shared_bytes",
    *(f"compiled_{name}" for name in _COMPILER_COUNTS),
)  # fmt: skip
_LOG_SCALED = {"analytic_latency_us", "analytic_compute_us", "analytic_memory_us", "analytic_programs",
               "compiled_shared_bytes"}  # fmt: skip


def _log2(value: Any) -> float:
    return math.log2(max(float(value or 1), 1.0))


def _shape_row(spec: dict[str, Any]) -> dict[str, float]:
    """Shape features of a Spec dict of any kind (absent fields are 0): attention dims, norm/RoPE rows and width."""
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(spec.get("dtype", "")).removeprefix("torch."), 2)
    shape = [int(d or 1) for d in spec.get("shape") or ()]
    rope = spec.get("rope") if spec.get("kind") == "attention" else spec
    rotary = (rope or {}).get("rotary_dim") or 0
    return {
        "log2_head_dim": _log2(spec.get("head_dim")), "log2_q_len": _log2(spec.get("q_len")),
        "log2_kv_len": _log2(spec.get("kv_len")),
        "log2_batch_heads": _log2((spec.get("batch") or 1) * (spec.get("q_heads") or 1)),
        "causal": float(bool(spec.get("causal"))), "gqa_group": float(spec.get("gqa_group") or 1),
        "itemsize": float(itemsize), "log2_rows": _log2(math.prod(shape[:-1]) if shape else 1),
        "log2_width": _log2(spec.get("width")),
        "rotary_fraction": rotary / max(int((rope or {}).get("head_dim") or spec.get("head_dim") or 1), 1),
        "layernorm": float(spec.get("kind") == "layernorm"), "has_bias": float(bool(spec.get("has_bias"))),
        "residual": float(bool(spec.get("residual"))),
    }  # fmt: skip


def record_vector(record: MeasurementRecord) -> np.ndarray:
    """The FEATURE_SCHEMA vector of one record (missing facts are 0, with flags saying which are known)."""
    config = record.config
    splits = int(config.get("num_splits", 0))  # 0: the launcher's heuristic (codegen.tile_config.HEURISTIC_SPLITS)
    row: dict[str, float] = {f"family_{name}": float(record.family == name) for name in KERNEL_FAMILIES}
    row |= {
        "log2_block_m": _log2(config["block_m"]), "log2_block_n": _log2(config["block_n"]),
        "log2_num_warps": _log2(config["num_warps"]), "num_stages": float(config["num_stages"]),
        "log2_num_splits": _log2(splits), "heuristic_splits": float(splits == 0),
    }  # fmt: skip
    row |= _shape_row(record.spec)
    analytic = record.features.get("analytic") or {}
    for name in _ANALYTIC:
        value = analytic.get(name)
        value = 0.0 if value is None or isinstance(value, bool) else float(value)
        row[f"analytic_{name}"] = value
    row["analytic_feasible"] = float(bool(analytic.get("feasible")))
    compiled = record.features.get("compiler") or {}
    row["compiled"] = float(compiled.get("status") == "ok")
    for name in ("registers", "spill_bytes", "shared_bytes"):
        row[f"compiled_{name}"] = float(compiled.get(name) or 0)
    counts = compiled.get("counts") or {}
    for name in _COMPILER_COUNTS:
        row[f"compiled_{name}"] = float(counts.get(name, 0))
    for name in _LOG_SCALED:
        row[name] = math.log2(1.0 + max(row[name], 0.0))
    return np.array([row[name] for name in FEATURE_SCHEMA], dtype=np.float64)


def group_indices(records: Sequence[MeasurementRecord]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(record.group, []).append(index)
    return groups


@dataclass
class LearnedModel:
    """Scores records: lower `score` = predicted faster; `feasible_prob` < 0.5 ranks a config last."""

    mean: np.ndarray
    std: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]  # (weight [out, in], bias [out]); last layer has 2 outputs
    trained_on: dict[str, Any] = field(default_factory=dict)
    schema: tuple[str, ...] = FEATURE_SCHEMA

    def _forward(self, features: np.ndarray) -> np.ndarray:
        hidden = (features - self.mean) / self.std
        for index, (weight, bias) in enumerate(self.layers):
            hidden = hidden @ weight.T + bias
            if index < len(self.layers) - 1:
                hidden = np.maximum(hidden, 0.0)
        return hidden

    def predict(self, records: Sequence[MeasurementRecord]) -> tuple[np.ndarray, np.ndarray]:
        """(latency scores, feasibility probabilities) of `records`."""
        if not records:
            return np.zeros(0), np.zeros(0)
        out = self._forward(np.stack([record_vector(r) for r in records]))
        return out[:, 0], 1.0 / (1.0 + np.exp(-out[:, 1]))

    def rank_scores(self, records: Sequence[MeasurementRecord]) -> np.ndarray:
        """Scores to sort by (ascending): predicted-infeasible configs get +inf."""
        score, feasible = self.predict(records)
        return np.where(feasible >= 0.5, score, np.inf)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT, "version": MODEL_VERSION, "feature_schema": list(self.schema),
            "mean": self.mean.tolist(), "std": self.std.tolist(),
            "layers": [{"weight": w.tolist(), "bias": b.tolist()} for w, b in self.layers],
            "trained_on": self.trained_on,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: object) -> LearnedModel:
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise ValueError(f"not a tilefuse cost model (expected format {MODEL_FORMAT!r})")
        if data.get("version") != MODEL_VERSION:
            raise ValueError(
                f"cost model version {data.get('version')!r}; this tilefuse reads version {MODEL_VERSION} (version 2 "
                "added the kernel family and num_splits features): retrain it with `tilefuse costmodel train`"
            )
        if tuple(data.get("feature_schema") or ()) != FEATURE_SCHEMA:
            raise ValueError("cost model feature schema differs from this tilefuse's; retrain it")
        layers = [(np.asarray(layer["weight"], dtype=np.float64), np.asarray(layer["bias"], dtype=np.float64))
                  for layer in data["layers"]]  # fmt: skip
        return cls(np.asarray(data["mean"]), np.asarray(data["std"]), layers, dict(data.get("trained_on") or {}))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> LearnedModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class TrainSettings:
    hidden: int = 64
    epochs: int = 300
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def train(records: Sequence[MeasurementRecord], settings: TrainSettings | None = None) -> LearnedModel:
    """Fit the ranker on `records` (needs at least one group with two ok records of different latency)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs several times faster without intra-op threads
    try:
        return _train(records, settings)
    finally:
        torch.set_num_threads(threads)


def _train(records: Sequence[MeasurementRecord], settings: TrainSettings | None) -> LearnedModel:
    import torch

    settings = settings or TrainSettings()
    if not records:
        raise ValueError("train: no records")
    torch.manual_seed(settings.seed)
    features = np.stack([record_vector(r) for r in records])
    mean, std = features.mean(axis=0), features.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    x = torch.tensor((features - mean) / std, dtype=torch.float32)
    ok = torch.tensor([r.status == "ok" for r in records], dtype=torch.float32)
    slower, faster, weight = (torch.tensor(a) for a in ranking_pairs(records))
    if not len(slower):
        raise ValueError("train: no group has two ok records of different latency to rank")
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], settings.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(settings.hidden, settings.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(settings.hidden, 2))  # fmt: skip
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    for _ in range(settings.epochs):
        optimizer.zero_grad()
        out = net(x)
        feasibility = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 1], ok)
        # RankNet: the slower config of each pair should score higher.
        ranking = (torch.nn.functional.softplus(out[faster, 0] - out[slower, 0]) * weight).sum()
        (feasibility + ranking).backward()
        optimizer.step()
    linear = [m for m in net if isinstance(m, torch.nn.Linear)]
    layers = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in linear]
    trained_on = {"records": len(records), "groups": len(group_indices(records)),
                  "specs": sorted({r.spec_json for r in records}), "gpus": sorted({r.gpu for r in records}),
                  "settings": settings.__dict__}  # fmt: skip
    return LearnedModel(mean, std, layers, trained_on)


def ranking_pairs(records: Sequence[MeasurementRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slower index, faster index, weight) of every pair of ok records of a group with different latencies.
    A pair weighs by its log-latency gap (capped at 1); each group's weights sum to 1/groups, so every group counts
    the same however many configs it has."""
    slower, faster, weights = [], [], []
    groups = [[i for i in idx if records[i].status == "ok"] for idx in group_indices(records).values()]
    groups = [g for g in groups if len(g) >= 2]
    for indices in groups:
        log_ms = np.log([records[i].median_ms for i in indices])
        gap = log_ms[:, None] - log_ms[None, :]
        rows, cols = np.nonzero(gap > 1e-6)
        if not len(rows):
            continue
        weight = np.minimum(gap[rows, cols], 1.0)
        slower += [indices[r] for r in rows]
        faster += [indices[c] for c in cols]
        weights.append(weight / weight.sum() / len(groups))
    flat = np.concatenate(weights) if weights else np.zeros(0)
    return np.array(slower, dtype=np.int64), np.array(faster, dtype=np.int64), flat.astype(np.float32)
