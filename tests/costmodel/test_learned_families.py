"""The learned ranker over several kernel families: the family one-hot and num_splits in its features, ranking
groups per (Spec, family, GPU), metrics per family in the evaluation report, and a versioned model schema. Labels
are synthetic (test data, never shipped): each family has its own best knobs, depending on the shape."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tilefuse.codegen.families import KERNEL_FAMILIES
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.costmodel.collect import record_features
from tilefuse.costmodel.evaluate import evaluation_report
from tilefuse.costmodel.hardware import get_gpu
from tilefuse.costmodel.learned import FEATURE_SCHEMA, LearnedModel, TrainSettings, record_vector, train
from tilefuse.costmodel.measure import Measurement
from tilefuse.costmodel.records import MeasurementRecord, make_record
from tilefuse.costmodel.space import build_space
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

H100 = get_gpu("h100")


def _bowl(**distances: float) -> float:
    return 1.0 + sum(weight * abs(value) for weight, value in zip((0.4, 0.2, 0.1), distances.values(), strict=False))


def synthetic_latency_ms(spec: Spec, config: TileConfig, family: str) -> float:
    if isinstance(spec, NormSpec):  # wide rows want more warps
        return _bowl(warps=math.log2(config.num_warps / (16 if spec.width > 4096 else 4)))
    if isinstance(spec, RopeSpec):
        return _bowl(rows=math.log2(config.block_m / 8), warps=math.log2(config.num_warps / 4))
    assert isinstance(spec, AttentionSpec)
    if family == "attention_decode":  # long caches want more splits
        best = 64 if int(spec.kv_len or 1) >= 16384 else 8
        return _bowl(splits=math.log2((config.num_splits or 32) / best), block_n=math.log2(config.block_n / 64))
    best_m = 128 if int(spec.q_len or 1) >= 1024 else 64
    return _bowl(block_m=math.log2(config.block_m / best_m), block_n=math.log2(config.block_n / 64),
                 warps=math.log2(config.num_warps / 8))  # fmt: skip


SPECS: dict[str, list[Spec]] = {
    "attention": [AttentionSpec(4, 8, 8, s, s, 64, 64, "bfloat16", 0.125, c) for s in (256, 2048) for c in (0, 1)],
    "attention_decode": [
        AttentionSpec(4, 32, 8, 1, n, 128, 128, "bfloat16", 0.09, True, "bottom_right", gqa_group=4)
        for n in (2048, 4096, 32768, 65536)
    ],
    "norm": [
        NormSpec("rmsnorm", w, (r, w), "bfloat16", 1e-6, out_dtype="bfloat16")
        for w in (2048, 8192)
        for r in (1024, 8192)
    ],
    "rope": [RopeSpec("rotate_half", r, 128, (1, 32, n, 128), "bfloat16") for r in (64, 128) for n in (512, 4096)],
}
CHOICES = {
    "attention": {"block_m": (32, 64, 128), "block_n": (32, 64), "num_warps": (4, 8), "num_stages": (2,)},
    "attention_decode": {"block_n": (32, 64), "num_warps": (4,), "num_stages": (2,), "num_splits": (4, 8, 32, 64)},
    "norm": {"num_warps": (2, 4, 8, 16, 32)},
    "rope": {"block_m": (2, 8, 32), "num_warps": (2, 4, 8)},
}  # fmt: skip


def _dataset() -> list[MeasurementRecord]:
    records = []
    for family, specs in SPECS.items():
        for spec in specs:
            for config in build_space(spec, H100, kind=family, choices=CHOICES[family]).configs:
                ms = synthetic_latency_ms(spec, config, family)
                records.append(make_record(
                    spec, config, "synthetic-h100", Measurement.ok(ms * 1e3, ms * 0.99e3, ms * 1.01e3), versions={},
                    features=record_features(spec, config, H100, False, family), family=family,
                ))  # fmt: skip
    return records


@pytest.fixture(scope="module")
def records() -> list[MeasurementRecord]:
    return _dataset()


def test_features_hold_the_family_and_the_splits(records: list[MeasurementRecord]) -> None:
    decode = next(r for r in records if r.family == "attention_decode" and r.config["num_splits"] == 64)
    row = dict(zip(FEATURE_SCHEMA, record_vector(decode), strict=True))
    one_hot = [row[f"family_{name}"] for name in KERNEL_FAMILIES]
    assert one_hot == [float(name == "attention_decode") for name in KERNEL_FAMILIES]
    assert row["log2_num_splits"] == 6.0 and row["heuristic_splits"] == 0.0
    norm = dict(zip(FEATURE_SCHEMA, record_vector(next(r for r in records if r.family == "norm")), strict=True))
    assert norm["log2_width"] == 11.0 and norm["log2_rows"] == 10.0 and norm["family_norm"] == 1.0


def test_train_and_report_per_family(records: list[MeasurementRecord]) -> None:
    assert len({r.group for r in records}) == sum(len(specs) for specs in SPECS.values())
    model = train(records, TrainSettings(epochs=200))
    report = evaluation_report(records, model)["all"]
    assert set(report["families"]) == set(SPECS)
    assert report["learned"]["groups"] == sum(f["learned"]["groups"] for f in report["families"].values())
    for family, metrics in report["families"].items():
        assert metrics["learned"]["pairwise_accuracy"] > 0.8, (family, metrics["learned"])
        assert set(metrics["analytic"]) == set(metrics["learned"])
    scores = model.rank_scores(records[:3])
    assert scores.shape == (3,) and np.isfinite(scores).all()


def test_old_model_schema_is_refused(records: list[MeasurementRecord]) -> None:
    saved = train(records[:40], TrainSettings(epochs=5)).to_dict()
    assert saved["version"] == 2
    LearnedModel.from_dict(saved)
    with pytest.raises(ValueError, match="retrain"):
        LearnedModel.from_dict({**saved, "version": 1})
