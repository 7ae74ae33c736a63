"""Ranking metrics of a cost model per group (same Spec, kernel family and GPU), TenSet style, and the evaluation
report: the learned model beside the analytic baseline, on all groups and on the splits the model never saw
(held-out shapes, held-out GPUs), overall and per kernel family. Scores are "lower = predicted faster"; only
measured ("ok") records carry a true latency.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .learned import group_indices
from .ranker import CostModel
from .records import MeasurementRecord

ScoreFn = Callable[[Sequence[MeasurementRecord]], np.ndarray]
METRICS = ("top1", "top5", "kendall_tau", "spearman_rho", "pairwise_accuracy", "slowdown_top1", "slowdown_top5")


@dataclass(frozen=True)
class GroupMetrics:
    size: int
    top1: float  # true best latency / true latency of the predicted best (1.0 = the model picks the best)
    top5: float  # the same for the best of the model's 5 first picks
    kendall_tau: float
    spearman_rho: float
    pairwise_accuracy: float
    slowdown_top1: float  # 1 / top1: how much slower than the best the model's pick runs
    slowdown_top5: float


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0
        start = end + 1
    return ranks


def spearman_rho(true: np.ndarray, predicted: np.ndarray) -> float:
    """Pearson correlation of the average ranks; nan when either side is constant."""
    a, b = _average_ranks(true), _average_ranks(predicted)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


def kendall_tau(true: np.ndarray, predicted: np.ndarray) -> float:
    """Kendall's τ-b (ties counted on each side); nan when either side is constant."""
    dt = np.sign(true[:, None] - true[None, :])
    dp = np.sign(predicted[:, None] - predicted[None, :])
    upper = np.triu(np.ones_like(dt, dtype=bool), 1)
    concordance = float((dt * dp)[upper].sum())
    denominator = math.sqrt(float((dt[upper] != 0).sum()) * float((dp[upper] != 0).sum()))
    return concordance / denominator if denominator > 0 else math.nan


def pairwise_accuracy(true: np.ndarray, predicted: np.ndarray) -> float:
    """Of the pairs whose true latencies differ, the fraction the prediction orders the same way (ties = 0.5)."""
    dt = np.sign(true[:, None] - true[None, :])
    dp = np.sign(predicted[:, None] - predicted[None, :])
    mask = np.triu(dt != 0, 1)
    if not mask.any():
        return math.nan
    agree = np.where(dp == 0, 0.5, (dt == dp).astype(float))
    return float(agree[mask].mean())


def top_k_score(true: np.ndarray, predicted: np.ndarray, k: int) -> float:
    """True best / the true latency of the best among the `k` configs predicted fastest (ties by input order)."""
    picks = np.argsort(predicted, kind="mergesort")[:k]
    return float(true.min() / true[picks].min())


def group_metrics(true: np.ndarray, predicted: np.ndarray) -> GroupMetrics:
    """Metrics of one group: `true` latencies of its ok records, `predicted` scores of the same records."""
    if len(true) != len(predicted) or len(true) < 1:
        raise ValueError(f"group_metrics: need equal, non-empty arrays, got {len(true)} and {len(predicted)}")
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    predicted = np.where(np.isfinite(predicted), predicted, np.finfo(float).max)  # predicted infeasible: last
    top1, top5 = top_k_score(true, predicted, 1), top_k_score(true, predicted, 5)
    return GroupMetrics(len(true), top1, top5, kendall_tau(true, predicted), spearman_rho(true, predicted),
                        pairwise_accuracy(true, predicted), 1.0 / top1, 1.0 / top5)  # fmt: skip


def evaluate(records: Sequence[MeasurementRecord], score: ScoreFn) -> dict[str, Any]:
    """Mean metrics over the groups with at least two ok records, plus the count of groups and records."""
    per_group: list[GroupMetrics] = []
    for indices in group_indices(records).values():
        ok = [records[i] for i in indices if records[i].status == "ok"]
        if len(ok) < 2:
            continue
        per_group.append(group_metrics(np.array([r.median_ms for r in ok]), np.asarray(score(ok))))
    summary: dict[str, Any] = {"groups": len(per_group), "records": sum(g.size for g in per_group)}
    for name in METRICS:
        values = [v for v in (asdict(g)[name] for g in per_group) if not math.isnan(v)]
        summary[name] = float(np.mean(values)) if values else None
    return summary


def analytic_scores(records: Sequence[MeasurementRecord]) -> np.ndarray:
    """The analytic model's predicted latency, as stored in each record's features (inf when it says infeasible)."""
    values = [(r.features.get("analytic") or {}).get("latency_us") for r in records]
    return np.array([math.inf if v is None else float(v) for v in values])


def splits(records: Sequence[MeasurementRecord], model: CostModel) -> dict[str, list[MeasurementRecord]]:
    """all; held_out_shapes (Specs the model was not trained on); held_out_gpu (GPUs it was not trained on)."""
    seen_specs = set(model.trained_on.get("specs") or ())
    seen_gpus = set(model.trained_on.get("gpus") or ())
    out = {"all": list(records), "held_out_shapes": [r for r in records if r.spec_json not in seen_specs]}
    if len({r.gpu for r in records}) > 1 or (seen_gpus and {r.gpu for r in records} - seen_gpus):
        out["held_out_gpu"] = [r for r in records if r.gpu not in seen_gpus]
    return out


def _compare(records: Sequence[MeasurementRecord], model: CostModel) -> dict[str, Any]:
    return {"learned": evaluate(records, model.rank_scores), "analytic": evaluate(records, analytic_scores)}


def evaluation_report(records: Sequence[MeasurementRecord], model: CostModel) -> dict[str, Any]:
    """{split: {"learned": metrics, "analytic": metrics, "families": {family: {"learned": ..., "analytic": ...}}}}
    for every split with data; the overall metrics average over every group of every family."""
    report: dict[str, Any] = {}
    for name, subset in splits(records, model).items():
        if subset:
            families = sorted({r.family for r in subset})
            by_family = {f: _compare([r for r in subset if r.family == f], model) for f in families}
            report[name] = {**_compare(subset, model), "families": by_family}
    return report


def scatter_plot(records: Sequence[MeasurementRecord], model: CostModel, path: str) -> bool:
    """Predicted score vs measured latency (ms), one point per ok record; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in records if r.status == "ok"]
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.scatter([r.median_ms for r in ok], model.predict(ok)[0], s=4)
    axis.set_xscale("log")
    axis.set_xlabel("measured median latency (ms)")
    axis.set_ylabel("learned score (lower = faster)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
