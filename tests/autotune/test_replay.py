"""Replay evaluation on a synthetic dataset: exhaustive groups (every config of the attention grid for two Specs on
H100), latencies from a deterministic function (`synthetic`), configs the constraints refuse recorded infeasible."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import pytest

from tilefuse.autotune.replay import STRATEGIES, Group, groups_of, replay, replay_files, run_strategy
from tilefuse.codegen.tile_config import HEURISTIC_SPLITS, PARAMS, TileConfig, config_from_dict
from tilefuse.compiler import cli
from tilefuse.costmodel.hardware import get_gpu
from tilefuse.costmodel.measure import Measurement
from tilefuse.costmodel.records import MeasurementRecord, make_record, write_records
from tilefuse.costmodel.space import build_space, infeasible_reasons
from tilefuse.specs import AttentionSpec, NormSpec

H100 = get_gpu("h100")
SPECS = [AttentionSpec(4, 8, 8, 512, 512, 64, 64, "bfloat16", 0.125, causal) for causal in (False, True)]
# A smaller grid than the attention family's knob grid keeps the cost model's predictions (the tilefuse strategy) quick.
CHOICES = {"block_m": (16, 32, 64, 128), "block_n": (16, 32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (2, 3, 4),
           "num_splits": (HEURISTIC_SPLITS,)}  # fmt: skip


def synthetic(spec: AttentionSpec, config: TileConfig) -> Measurement:
    """A bowl over the knobs (minimum near 64x64, 4 warps, 3 stages; causal shifts it to 64x32), shallow in warps and
    stages and with a ripple, so several configs lie within 3% of the best; block_n 16 with 2 warps "fails to
    compile"."""
    if config.block_n == 16 and config.num_warps == 2:
        return Measurement("compile-fail", error="synthetic: out of registers")
    best_n = 32 if spec.causal else 64
    value = (20.0 + 3 * abs(math.log2(config.block_m / 64)) + 2 * abs(math.log2(config.block_n / best_n))
             + 0.3 * abs(math.log2(config.num_warps / 4)) + 0.2 * abs(config.num_stages - 3)
             + 0.3 * ((config.block_m * 7 + config.block_n * 3 + config.num_stages) % 5) / 5)  # fmt: skip
    return Measurement.ok(value, value * 0.98, value * 1.02)


def synthetic_records() -> list[MeasurementRecord]:
    records = []
    for spec in SPECS:
        for values in itertools.product(*(CHOICES[n] for n in PARAMS)):
            config = config_from_dict(dict(zip(PARAMS, values, strict=True)))
            reasons = infeasible_reasons(spec, config, H100)
            result = Measurement("infeasible", error="; ".join(reasons)) if reasons else synthetic(spec, config)
            records.append(make_record(spec, config, H100.name, result, versions={}, features={}))
    return records


@pytest.fixture(scope="module")
def groups() -> list[Group]:
    return groups_of(synthetic_records())


def test_groups_are_exhaustive(groups: list[Group]) -> None:
    grid = math.prod(len(v) for v in CHOICES.values())
    assert len(groups) == 2 and all(len(g.latency_us) == grid for g in groups)
    assert all(any(math.isinf(v) for v in g.latency_us.values()) for g in groups)  # failures are kept
    assert {g.best[0].block_n for g in groups} == {32, 64}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_reaches_the_best(groups: list[Group], strategy: str) -> None:
    for group in groups:
        for seed in range(3):
            reached = run_strategy(strategy, group, seed)
            assert reached is not None and 1 <= reached <= len(group.latency_us), (strategy, seed)


def test_exhaustive_needs_at_most_the_group_size(groups: list[Group]) -> None:
    for group in groups:
        order = group.configs
        expected = next(i for i, c in enumerate(order, 1) if group.latency_us[c] <= group.target_us)
        assert run_strategy("exhaustive", group, 0) == expected <= len(group.latency_us)


def test_random_median_over_seeds_is_sane(groups: list[Group]) -> None:
    for group in groups:
        size = len(group.latency_us)
        hits = sum(v <= group.target_us for v in group.latency_us.values())
        runs = [run_strategy("random", group, seed) for seed in range(100)]
        assert all(r is not None and 1 <= r <= size - hits + 1 for r in runs)
        # The first hit of a uniform permutation: mean (size + 1) / (hits + 1).
        mean = statistics.fmean(r for r in runs if r is not None)
        assert 0.7 < mean / ((size + 1) / (hits + 1)) < 1.3
        assert 1 <= statistics.median(r for r in runs if r is not None) <= 1.2 * mean


def test_report_summarizes_over_seeds_and_groups(groups: list[Group]) -> None:
    report = replay(groups, seeds=10, budget=16, strategies=("random", "exhaustive", "coordinate"))
    rows = {row["strategy"]: row for row in report["strategies"]}
    assert rows["exhaustive"]["reached"] == 1.0 and rows["coordinate"]["reached"] == 1.0
    assert all(len(g["runs"]) == 10 for row in rows.values() for g in row["per_group"])
    assert rows["random"]["median"] == statistics.median(g["median"] for g in rows["random"]["per_group"])
    assert report["groups"][0]["best_us"] == min(groups[0].latency_us.values())


def test_cli_replay_prints_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "synthetic.jsonl.gz"
    write_records(data, synthetic_records())
    assert cli.main(["tune", "--replay", str(data), "--seeds", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["strategy"] for row in report["strategies"]] == list(STRATEGIES)
    assert all(row["reached"] == 1.0 and row["median"] >= 1 for row in report["strategies"])
    assert cli.main(["tune", "--replay", str(tmp_path), "--seeds", "10", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "tilefuse" in out and "coordinate" in out and "within 3%" in out
    assert cli.main(["tune", "--replay", str(data), "--gpu", "a100"]) == 2  # no group for that GPU
    assert cli.main(["tune"]) == 2  # neither MODEL nor --replay


def test_replay_files_rejects_missing_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        replay_files([tmp_path / "nope.jsonl.gz"])
    with pytest.raises(ValueError, match="no measurement records"):
        replay_files([tmp_path])


def test_groups_split_by_kernel_family_and_replay_each() -> None:
    norm = NormSpec("rmsnorm", 4096, (2, 128, 4096), "bfloat16", 1e-6)
    records = []
    for kind in ("norm", "norm_backward"):
        for config in build_space(norm, H100, kind=kind).configs:
            value = 5.0 + abs(math.log2(config.num_warps / 8)) + (config.num_splits or 132) / 132
            records.append(make_record(norm, config, H100.name, Measurement.ok(value), versions={}, features={},
                                       family=kind))  # fmt: skip
    families = groups_of(records)
    assert sorted(g.family for g in families) == ["norm", "norm_backward"]
    backward = next(g for g in families if g.family == "norm_backward")
    assert len(backward.choices["num_splits"]) > 1 and backward.best[0].num_warps == 8
    assert "norm_backward rmsnorm" in backward.describe()
    for group in families:
        for strategy in STRATEGIES:
            reached = run_strategy(strategy, group, 0)
            assert reached is not None and reached <= len(group.latency_us), (group.family, strategy)
    report = replay(families, seeds=2, strategies=("exhaustive", "coordinate"))
    assert {g["family"] for g in report["groups"]} == {"norm", "norm_backward"} and not report["notes"]
