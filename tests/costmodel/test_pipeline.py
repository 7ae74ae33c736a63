"""The cost-model pipeline on CPU: records round-trip and validate, collection under the interpreter is resumable,
ranking metrics are right on hand-made groups, and a model trained on a synthetic latency function (test data,
never shipped) ranks held-out shapes well through `tilefuse costmodel train/eval`."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tilefuse.codegen.tile_config import TileConfig
from tilefuse.compiler.cli import main
from tilefuse.costmodel.collect import collect, interpreter_measure, plan_tasks, record_features, shape_grid
from tilefuse.costmodel.evaluate import group_metrics, kendall_tau, spearman_rho
from tilefuse.costmodel.hardware import get_gpu
from tilefuse.costmodel.learned import LearnedModel
from tilefuse.costmodel.measure import Measurement
from tilefuse.costmodel.records import MeasurementRecord, iter_records, make_record, read_records, write_records
from tilefuse.costmodel.space import build_space
from tilefuse.costmodel.split import held_out_spec
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

H100 = get_gpu("h100")
CHOICES = {"block_m": (16, 32), "block_n": (16,), "num_warps": (4,), "num_stages": (1, 2)}


def _spec(seq: int, head_dim: int = 64, causal: bool = False) -> AttentionSpec:
    return AttentionSpec(4, 8, 8, seq, seq, head_dim, head_dim, "bfloat16", head_dim**-0.5, causal)


def _record(status: str = "ok", **changes: object) -> MeasurementRecord:
    measurement = Measurement.ok(50.0, 45.0, 60.0) if status == "ok" else Measurement(status, error="boom")
    record = make_record(_spec(256), TileConfig(64, 32, 4, 2), "NVIDIA H100 SXM", measurement,
                         versions={"torch": "x"}, features={"analytic": {"latency_us": 12.0}})  # fmt: skip
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------- records
def test_records_round_trip(tmp_path: Path) -> None:
    records = [_record(), _record("compile-fail"), _record("wrong-output"), _record("timeout")]
    assert [r.status for r in records] == ["ok", "infeasible", "mismatch", "error"]
    assert records[0].latency_ms == {"p20": 0.045, "median": 0.05, "p80": 0.06}
    path = tmp_path / "data" / "r.jsonl.gz"
    assert write_records(path, records[:2]) == 2
    write_records(path, records[2:])  # a second gzip member: the file still reads as one
    assert list(iter_records(path)) == records
    assert records[0].key != records[1].key or records[0].group == records[1].group


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"status": "fast"}, "status"), ({"latency_ms": {"median": 1.0}}, "latency_ms"),
     ({"latency_ms": {"p20": 1.0, "median": -1.0, "p80": 2.0}}, "finite"), ({"gpu": ""}, "gpu"),
     ({"config": {"block_m": 64}}, "keys"), ({"version": 99}, "version")],
)  # fmt: skip
def test_record_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        _record(**changes)


def test_a_bad_row_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl.gz"
    row = _record().to_dict()
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps(row) + "\n" + json.dumps({**row, "status": "??"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz:2"):
        read_records([path])


# ----------------------------------------------------------------------------------------------------- collect
def test_collect_under_the_interpreter_is_resumable(tmp_path: Path) -> None:
    specs = shape_grid("attention", "tiny")
    tasks = plan_tasks(specs, H100, CHOICES)
    out = tmp_path / "interp.jsonl.gz"
    first = collect(tasks, out, interpreter_measure, H100, gpu_name="triton-interpreter", interpreted=True)
    records = list(iter_records(out))
    assert first.written == len(records) == len(tasks) >= 4
    assert {r.spec_json for r in records} == {json.dumps(s.to_dict(), sort_keys=True) for s in specs}
    ok = [r for r in records if r.status == "ok"]
    assert ok and all(r.interpreted and r.latency_ms["p20"] <= r.latency_ms["median"] <= r.latency_ms["p80"]
                      for r in ok)  # fmt: skip
    assert all(r.features["analytic"]["latency_us"] > 0 for r in ok)
    again = collect(tasks, out, interpreter_measure, H100, gpu_name="triton-interpreter", interpreted=True)
    assert (again.written, again.skipped) == (0, len(tasks))
    assert len(list(iter_records(out))) == len(records)


def test_collect_command(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl.gz"
    assert main(["costmodel", "collect", "--interpret", "--out", str(out), "--limit", "2"]) == 0
    records = list(iter_records(out))
    assert len(records) == 2 and all(r.interpreted and r.gpu == "triton-interpreter" for r in records)


def test_collect_records_rejected_configs_and_limit(tmp_path: Path) -> None:
    calls: list[TileConfig] = []

    def measure(spec: object, config: TileConfig, kind: str) -> Measurement:
        calls.append(config)
        return Measurement("compile-fail", error="synthetic")

    tasks = plan_tasks([_spec(64)], H100, {**CHOICES, "block_m": (16, 128)})  # 128 > 64 rows: rejected
    out = tmp_path / "r.jsonl.gz"
    assert collect(tasks, out, measure, H100, limit=1).written == 1
    summary = collect(tasks, out, measure, H100)
    assert summary.skipped == 1 and summary.written == len(tasks) - 1
    details = [r.detail or "" for r in iter_records(out)]
    assert any(d.startswith("infeasible: rejected") for d in details) and len(calls) < len(tasks)


# ----------------------------------------------------------------------------------------------------- metrics
def test_metrics_on_hand_made_groups() -> None:
    true = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    perfect = group_metrics(true, true * 10)
    assert (perfect.top1, perfect.top5, perfect.kendall_tau, perfect.pairwise_accuracy) == (1.0, 1.0, 1.0, 1.0)
    assert perfect.spearman_rho == pytest.approx(1.0)
    reverse = group_metrics(true, -true)
    assert reverse.kendall_tau == -1.0 and reverse.spearman_rho == pytest.approx(-1.0)
    assert reverse.top1 == pytest.approx(1 / 6) and reverse.slowdown_top1 == pytest.approx(6.0)
    assert reverse.top5 == pytest.approx(1 / 2) and reverse.pairwise_accuracy == 0.0
    one_swap = group_metrics(true, np.array([2.0, 1.0, 3.0, 4.0, 5.0, 6.0]))
    assert one_swap.top1 == 0.5 and one_swap.top5 == 1.0
    assert one_swap.kendall_tau == pytest.approx(13 / 15) and one_swap.pairwise_accuracy == pytest.approx(14 / 15)
    assert group_metrics(true, np.array([1.0, math.inf, 3, 4, 5, 6])).top1 == 1.0  # predicted infeasible goes last


def test_rank_correlations_with_ties() -> None:
    a, b = np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(a, b) == pytest.approx(5 / math.sqrt(5 * 6))  # τ-b
    assert spearman_rho(a, b) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(kendall_tau(a, np.ones(4)))


# ------------------------------------------------------------------------------------- synthetic train and eval
def synthetic_latency_ms(spec: AttentionSpec, config: TileConfig) -> float:
    """Test-only labels: a bowl over the knobs whose best block_m grows with the sequence length."""
    best_m = 128 if int(spec.q_len or 1) >= 1024 else 64
    return (1.0 + 0.3 * abs(math.log2(config.block_m / best_m)) + 0.2 * abs(math.log2(config.block_n / 64))
            + 0.1 * abs(math.log2(config.num_warps / 8)) + 0.05 * abs(config.num_stages - 3))  # fmt: skip


def _synthetic_dataset(path: Path, gpu: str = "h100", seqs: tuple[int, ...] = (256, 512, 1024, 4096)) -> None:
    choices = {"block_m": (32, 64, 128), "block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3)}
    records, table_entry = [], get_gpu(gpu)
    for spec in [_spec(s, d, c) for s in seqs for d in (64, 128) for c in (False, True)]:
        for config in build_space(spec, table_entry, choices=choices).configs:
            ms = synthetic_latency_ms(spec, config)
            measurement = Measurement.ok(ms * 1e3, ms * 0.99e3, ms * 1.01e3)
            records.append(make_record(spec, config, f"synthetic-{gpu}", measurement, versions={},
                                       features=record_features(spec, config, table_entry, False)))  # fmt: skip
    write_records(path, records)


@pytest.mark.parametrize("kind", ["gbdt", "mlp"])
def test_train_and_eval_on_synthetic_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    data, model = tmp_path / "synthetic.jsonl.gz", tmp_path / "synthetic-model.json"
    # 20 Specs: the split holds each out by its hash, 9 of them here (45%, not 30%), and the rest must still cover
    # both sides of the synthetic optimum's change at 1024 (16 Specs left the MLP 9 to learn from: tau 0.76)
    _synthetic_dataset(data, seqs=(256, 512, 1024, 2048, 4096))
    args = ["--data", str(data), "--out", str(model), "--holdout-shapes", "0.3", "--kind", kind]
    assert main(["costmodel", "train", *args]) == 0
    saved = json.loads(model.read_text())
    assert saved["format"] == f"tilefuse-costmodel-{kind}" and saved["feature_schema"]
    capsys.readouterr()
    assert main(["costmodel", "eval", "--model", str(model), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    held_out = report["held_out_shapes"]
    assert held_out["learned"]["groups"] >= 1
    assert held_out["learned"]["kendall_tau"] > 0.8 and held_out["learned"]["top1"] > 0.9
    assert set(held_out["analytic"]) == set(held_out["learned"])
    assert main(["costmodel", "eval", "--model", str(model), "--data", str(data)]) == 0  # the table renders


def test_held_out_gpu_split_and_model_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, model = tmp_path / "synthetic.jsonl.gz", tmp_path / "synthetic-model.json"
    _synthetic_dataset(data, "h100", (512, 2048))
    _synthetic_dataset(data, "a100", (512,))
    args = ["--data", str(data), "--out", str(model), "--holdout-gpu", "synthetic-a100", "--kind", "mlp",
            "--epochs", "100"]  # fmt: skip
    assert main(["costmodel", "train", *args]) == 0
    capsys.readouterr()
    assert main(["costmodel", "eval", "--model", str(model), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["held_out_gpu"]["learned"]["groups"] == 4  # 512 × head dims × causal on the unseen GPU
    saved = json.loads(model.read_text())
    LearnedModel.from_dict(saved)
    with pytest.raises(ValueError, match="schema"):
        LearnedModel.from_dict({**saved, "feature_schema": saved["feature_schema"][:-1]})
    with pytest.raises(ValueError, match="format"):
        LearnedModel.from_dict({"format": "pickle"})


# One Spec of each kind with every defaulted field at its default (the attention's RoPE Spec too), some of the
# fields added after records were first written, and a field whose other value must move the Spec.
_SPLIT_CASES = [
    (NormSpec("rmsnorm", 64, (2, 8, 64), "bfloat16", 1e-6), {"eps_mode", "norm_scale", "dynamic_scalars"},
     {"eps_mode": "clamp_norm"}),
    (AttentionSpec(4, 8, 8, 256, 256, 64, 64, "bfloat16", 0.125, rope=RopeSpec("rotate_half", 64, 64)),
     {"sinks", "dynamic_scalars", "rope.source"}, {"causal": True}),
    (RopeSpec("interleaved", 32, 64), {"shape", "dtype", "source"}, {"source": "complex"}),
]  # fmt: skip
_FRACTIONS = [i / 64 for i in range(1, 64)]


def _sides(fields: dict[str, object]) -> list[bool]:
    """Which side of the split a Spec's record falls on, at each of a fine grid of held-out fractions."""
    return [held_out_spec(json.dumps(fields, sort_keys=True), fraction) for fraction in _FRACTIONS]


def _without_each_default(spec: Spec) -> dict[str, dict[str, object]]:
    """The Spec's dict as a record written before each defaulted field existed would hold it: that field absent
    (fields of a nested Spec included)."""
    full, out = spec.to_dict(), {}
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if field.name != "kind" and field.default is not dataclasses.MISSING and value == field.default:
            out[field.name] = {k: v for k, v in full.items() if k != field.name}
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for name, nested in _without_each_default(value).items():
                out[f"{field.name}.{name}"] = {**full, field.name: nested}
    return out


@pytest.mark.parametrize(("spec", "later", "change"), _SPLIT_CASES, ids=[case[0].kind for case in _SPLIT_CASES])
def test_held_out_split_ignores_fields_at_their_default(spec: Spec, later: set[str], change: dict[str, Any]) -> None:
    """A record written before a field was added to its Spec class (absent) and one written after (at the default)
    hold the same Spec and must fall on the same side of the held-out split; a value off the default moves it."""
    older = _without_each_default(spec)
    assert later <= set(older)
    for name, fields in older.items():
        assert _sides(fields) == _sides(spec.to_dict()), f"leaving out {name} moved the Spec"
    assert _sides(dataclasses.replace(spec, **change).to_dict()) != _sides(spec.to_dict())


def test_warm_kernels_launches_every_task_in_worker_processes(tmp_path: Path) -> None:
    """The warm-up pool (collect --jobs N) launches each config once in spawned workers; under the interpreter
    the workers inherit TRITON_INTERPRET=1 and run on the CPU."""
    from tilefuse.costmodel.collect import warm_kernels

    tasks = [t for t in plan_tasks(shape_grid("norm", "tiny"), get_gpu("h100"), {"num_warps": (1, 2)}, kind="norm")
             if not t.rejected]  # fmt: skip
    assert len({t.spec for t in tasks}) >= 2 and len(tasks) >= 3
    assert warm_kernels(tasks, jobs=2, device="cpu") == len(tasks)
    assert warm_kernels([], jobs=2, device="cpu") == 0
