"""Replay evaluation (`tilefuse tune --replay DATA`): search strategies simulated on measured data with exhaustive
ground truth, without a GPU.

A group is every config of one Spec and kernel family measured on one GPU (costmodel/records.py). Each strategy
proposes configs one at a time; "measuring" one returns its recorded median latency (a failed or infeasible record, or
a config the data lacks, counts as a measurement that yields no result; a config measured before is not counted
again). The score of
one run is the number of configs measured until one lies within `margin` (3%) of the group's exhaustive best.

Strategies: "tilefuse" (the shipped search, `search.optuna_search`, with its measure function replaced by the
replay lookup: default config and cost-model top-k enqueued first, then TPE screened by the cost model), "tpe"
(Optuna's TPE alone, seeded), "random" (uniform, without replacement), "exhaustive" (every config in the config
list's order, as Triton's autotune does) and "coordinate" (Inductor's coordinate descent: from the default config,
try each knob's neighbouring values, move to the best, repeat until no knob improves).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from tilefuse.codegen.families import default_config
from tilefuse.codegen.tile_config import PARAMS, TileConfig, config_from_dict, config_to_dict
from tilefuse.costmodel.hardware import GPUSpec, get_gpu
from tilefuse.costmodel.measure import Measurement
from tilefuse.costmodel.records import MeasurementRecord, read_records
from tilefuse.costmodel.space import SearchSpace, build_space
from tilefuse.specs import Spec, spec_from_dict

STRATEGIES: tuple[str, ...] = ("tilefuse", "tpe", "random", "exhaustive", "coordinate")
DETERMINISTIC = frozenset({"exhaustive", "coordinate"})  # seed-independent: run once per group
MARGIN = 0.03
MAX_ASKS_PER_CONFIG = 20  # TPE alone may keep proposing measured configs: give up after this many asks per config


def _order(config: TileConfig) -> tuple[int, ...]:
    """The config's knobs as ints in PARAMS order (num_splits None as HEURISTIC_SPLITS)."""
    return tuple(config_to_dict(config).values())


def _config(values: dict[str, Any]) -> TileConfig:
    return config_from_dict({name: int(values[name]) for name in PARAMS})


@dataclass(frozen=True, eq=False)
class Group:
    """Every config of one Spec and kernel family (`family`) measured on one GPU: median latency in µs per config
    (inf: failed/infeasible). Compared and hashed by identity (it caches derived values)."""

    key: str
    spec: Spec
    gpu: str
    latency_us: dict[TileConfig, float]
    family: str = "attention"

    @functools.cached_property
    def configs(self) -> tuple[TileConfig, ...]:
        """The config list in its natural (grid) order: block_m, block_n, num_warps, num_stages, num_splits
        ascending."""
        return tuple(sorted(self.latency_us, key=_order))

    @functools.cached_property
    def choices(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(sorted({config_to_dict(c)[n] for c in self.latency_us})) for n in PARAMS}

    @functools.cached_property
    def best(self) -> tuple[TileConfig, float]:
        config = min(self.configs, key=lambda c: self.latency_us[c])
        return config, self.latency_us[config]

    @functools.cached_property
    def target_us(self) -> float:
        return self.best[1] * (1 + MARGIN)

    def describe(self) -> str:
        data = self.spec.to_dict()
        dims = "x".join(str(data.get(k)) for k in ("batch", "q_heads", "q_len", "kv_len", "head_dim"))
        if data.get("kind") != "attention":
            return f"{self.family} {data.get('kind')} {data.get('shape')} {data.get('dtype')} on {self.gpu}"
        flags = "causal" if data.get("causal") else "full"
        return f"{self.family} {dims} {data.get('dtype')} {flags} on {self.gpu}"


def data_files(paths: Iterable[str | Path]) -> list[Path]:
    """The record files named: a file as is, a directory as every *.jsonl.gz under it."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files += sorted(path.rglob("*.jsonl.gz"))
        elif path.exists():
            files.append(path)
        else:
            raise ValueError(f"replay data {str(path)!r} does not exist")
    if not files:
        raise ValueError(f"no measurement records (*.jsonl.gz) under {[str(p) for p in paths]}")
    return files


def _gpu_name(name: str) -> str:
    try:
        return get_gpu(name).name
    except ValueError:
        return name


def groups_of(records: Iterable[MeasurementRecord], gpu: str | None = None) -> list[Group]:
    """Groups (one Spec, kernel family and GPU) with at least two configs and one that ran; a config recorded twice
    keeps the median of its medians. `gpu` keeps only that GPU's groups (any name or alias `get_gpu` knows)."""
    wanted = _gpu_name(gpu) if gpu else None
    rows: dict[str, list[MeasurementRecord]] = {}
    for record in records:
        if wanted is None or _gpu_name(record.gpu) == wanted:
            # Records written before kernel families existed are attention forward measurements.
            rows.setdefault(f"{record.group}|{_family(record)}", []).append(record)
    out = []
    for key, group in rows.items():
        values: dict[TileConfig, list[float]] = {}
        for record in group:
            values.setdefault(record.tile_config, []).append(record.median_ms * 1e3)
        latency = {c: _median_ok(v) for c, v in values.items()}
        if len(latency) >= 2 and any(map(math.isfinite, latency.values())):
            out.append(Group(key, spec_from_dict(group[0].spec), group[0].gpu, latency, _family(group[0])))
    return sorted(out, key=lambda g: g.key)


def _family(record: MeasurementRecord) -> str:
    return str(getattr(record, "family", "attention"))


def _median_ok(values: list[float]) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return float(statistics.median(ok)) if ok else math.inf


class Reached(BaseException):
    """Raised by the lookup once a measurement is within the margin: ends a search early. A BaseException, so the
    search's `safe_measure` (which records Exceptions as failed configs) lets it through."""


@dataclass
class Replay:
    """The shared lookup: `measure(spec, config)` returns the recorded median and counts each distinct config once;
    `reached_at` is how many configs had been measured when the first one within the margin came back."""

    group: Group
    stop_on_reach: bool = True
    measured: list[TileConfig] = field(default_factory=list)
    reached_at: int | None = None
    _seen: set[TileConfig] = field(default_factory=set)

    def measure(self, spec: Spec, config: TileConfig) -> Measurement:
        config = config_from_dict(config_to_dict(config))
        value = self.group.latency_us.get(config)
        if config not in self._seen:
            self._seen.add(config)
            self.measured.append(config)
            if value is not None and value <= self.group.target_us and self.reached_at is None:
                self.reached_at = len(self.measured)
                if self.stop_on_reach:
                    raise Reached
        if value is None:
            return Measurement("error", error="config not in the replay data")
        if not math.isfinite(value):
            return Measurement("infeasible", error="recorded as failed or infeasible")
        return Measurement.ok(value)

    def value(self, config: TileConfig) -> float:
        return self.measure(self.group.spec, config).median_us


# ---------------------------------------------------------------------------------------------------- strategies
@functools.lru_cache(maxsize=4)
def _search_inputs(group: Group) -> tuple[GPUSpec, SearchSpace, dict[TileConfig, float]]:
    """What tune_spec computes before searching (the seed does not change it): the GPU, the feasible space of the
    group's knob grid under the real constraints, and the cost model's predictions."""
    from .search import predicted_latencies

    gpu = get_gpu(group.gpu)
    space = build_space(group.spec, gpu, kind=group.family, choices=dict(group.choices))
    return gpu, space, predicted_latencies(group.spec, space.configs, gpu, group.family)


def run_tilefuse(replay: Replay, seed: int) -> None:
    """The shipped search (search.optuna_search) on the group's knob grid, filtered by the real constraints; it
    runs until it has measured the whole space (budget and patience = space size) or the lookup stops it."""
    from .keys import tuning_key
    from .search import TuneSettings, optuna_search

    group = replay.group
    gpu, space, predicted = _search_inputs(group)
    size = len(space.configs)
    settings = TuneSettings(mode="measure", budget=size, patience=size, seed=seed, remeasure=0)
    key = tuning_key(group.spec, gpu.arch, kind=group.family)
    optuna_search(group.spec, key, space, predicted, replay.measure, settings, None)


def run_tpe(replay: Replay, seed: int) -> None:
    """Optuna's TPE sampler alone (defaults, seeded) over the group's knob grid; no constraints, no cost model."""
    choices = replay.group.choices
    grid = math.prod(len(v) for v in choices.values())
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    distributions: dict[str, BaseDistribution] = {n: CategoricalDistribution(choices[n]) for n in PARAMS}
    for _ in range(MAX_ASKS_PER_CONFIG * grid):
        if len(replay.measured) >= grid:
            return
        trial = study.ask(distributions)
        value = replay.value(_config(trial.params))
        if math.isfinite(value):
            study.tell(trial, value)
        else:
            study.tell(trial, state=TrialState.FAIL)


def run_random(replay: Replay, seed: int) -> None:
    order = list(replay.group.configs)
    random.Random(seed).shuffle(order)
    for config in order:
        replay.value(config)


def run_exhaustive(replay: Replay, seed: int) -> None:
    for config in replay.group.configs:
        replay.value(config)


def run_coordinate(replay: Replay, seed: int) -> None:
    """Inductor-style coordinate descent: neighbours are the adjacent values of one knob in its choice list."""
    group = replay.group
    choices = group.choices
    start = default_config(group.spec, group.family)
    best = start if start in group.latency_us else group.configs[0]
    best_us = replay.value(best)
    improved = True
    while improved:
        improved = False
        for name in PARAMS:
            values = choices[name]
            index = values.index(config_to_dict(best)[name])
            neighbours = [values[i] for i in (index - 1, index + 1) if 0 <= i < len(values)]
            tried = {}
            for value in neighbours:
                candidate = _config({**config_to_dict(best), name: value})
                tried[candidate] = replay.value(candidate)
            if tried:
                candidate = min(tried, key=lambda c: tried[c])
                if tried[candidate] < best_us * (1 - 1e-3):  # Inductor's 0.1% improvement threshold
                    best, best_us, improved = candidate, tried[candidate], True


RUNNERS: dict[str, Callable[[Replay, int], None]] = {
    "tilefuse": run_tilefuse, "tpe": run_tpe, "random": run_random, "exhaustive": run_exhaustive,
    "coordinate": run_coordinate,
}  # fmt: skip


def run_strategy(name: str, group: Group, seed: int) -> int | None:
    """Configs measured until one was within the margin of the group's best; None when the strategy stopped first."""
    lookup = Replay(group)
    with contextlib.suppress(Reached):
        RUNNERS[name](lookup, seed)
    return lookup.reached_at


# ------------------------------------------------------------------------------------------------------- report
def _median(runs: Sequence[int | None]) -> float:
    return float(statistics.median(math.inf if r is None else r for r in runs))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _summary(name: str, runs_of: dict[str, list[int | None]], budget: int) -> dict[str, Any]:
    medians = [_median(runs) for runs in runs_of.values()]
    reached = [r for runs in runs_of.values() for r in runs if r is not None]
    total = sum(len(runs) for runs in runs_of.values())
    return {
        "strategy": name, "groups": len(runs_of),
        "median": _finite(float(statistics.median(medians))) if medians else None,
        "mean": statistics.fmean(reached) if reached else None,
        "reached": len(reached) / total if total else 0.0,
        "groups_within_budget": sum(m <= budget for m in medians) / len(medians) if medians else 0.0,
        "per_group": [{"group": key, "runs": runs, "median": _finite(m)}
                      for (key, runs), m in zip(runs_of.items(), medians, strict=True)],
    }  # fmt: skip


def replay(
    groups: Sequence[Group], *, seeds: int = 10, budget: int = 16, strategies: Sequence[str] = STRATEGIES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run every strategy on every group with seeds 0..seeds-1; the JSON report. Per strategy: `median` (over
    groups of each group's median over seeds; null when most runs never reached), `mean` (over the runs that
    reached), `reached` (fraction of runs that reached at all), `groups_within_budget` (fraction of groups whose
    median is ≤ budget) and per-group runs."""
    unknown = [s for s in strategies if s not in RUNNERS]
    if unknown or not groups or seeds < 1:
        raise ValueError(f"strategies {unknown} unknown (choose from {list(STRATEGIES)})" if unknown else
                         "no groups to replay" if not groups else f"seeds must be >= 1, got {seeds}")  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    notes: list[str] = []
    rows = []
    for name in strategies:
        runs_of: dict[str, list[int | None]] = {}
        for group in groups:
            if progress:
                progress(f"{name}: {group.describe()}")
            try:
                if name in DETERMINISTIC:
                    runs_of[group.key] = [run_strategy(name, group, 0)] * seeds
                else:
                    runs_of[group.key] = [run_strategy(name, group, seed) for seed in range(seeds)]
            except ValueError as err:  # unknown GPU, no feasible config: the strategy cannot run on this group
                notes.append(f"{name} skipped {group.describe()}: {err}")
        rows.append(_summary(name, runs_of, budget))
    return {
        "margin": MARGIN, "seeds": seeds, "budget": budget,
        "groups": [{"key": g.key, "describe": g.describe(), "gpu": g.gpu, "family": g.family,
                    "configs": len(g.latency_us),
                    "ok": sum(map(math.isfinite, g.latency_us.values())), "best": config_to_dict(g.best[0]),
                    "best_us": g.best[1]} for g in groups],
        "strategies": rows, "notes": notes,
    }  # fmt: skip


def replay_files(
    paths: Iterable[str | Path], *, gpu: str | None = None, seeds: int = 10, budget: int = 16,
    strategies: Sequence[str] = STRATEGIES, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`replay` on the groups of the record files (or directories) at `paths`."""
    files = data_files(paths)
    groups = groups_of(read_records(files), gpu)
    if not groups:
        raise ValueError(f"no group with >= 2 configs and a successful measurement in {[str(f) for f in files]}"
                         + (f" for gpu {gpu!r}" if gpu else ""))  # fmt: skip
    report = replay(groups, seeds=seeds, budget=budget, strategies=strategies, progress=progress)
    report["data"] = [str(f) for f in files]
    report["gpu"] = gpu
    return report
