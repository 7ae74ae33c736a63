"""The measured search as an Optuna study: a TPE sampler whose proposals are screened (hard constraints, then the
cost model) before a trial gets its config, and the ask → measure → tell loop one worker runs.

Any number of workers may run the loop on one study in shared storage (PostgreSQL, or SQLite for the embedded
default, both through Optuna's RDBStorage): a worker heartbeats while it measures, and every worker fails stale
trials (a worker that died mid-measurement) before asking, so a killed worker loses one trial, not the study. Two
workers that draw the same config resolve it by trial number: the later one is pruned as a duplicate.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat  # not re-exported; the interface both RDB classes implement
from optuna.trial import FrozenTrial, TrialState

from tilefuse.codegen.tile_config import PARAMS, TileConfig, config_from_dict, config_to_dict
from tilefuse.costmodel.measure import Measurement
from tilefuse.specs import Spec

from .records import Trial

log = logging.getLogger("tilefuse.autotune")

MeasureFn = Callable[[Spec, TileConfig], Measurement]
MIN_IMPROVEMENT = 0.005  # a new best must beat the old by 0.5% to reset the patience counter


def config_of(params: Mapping[str, Any]) -> TileConfig | None:
    """The TileConfig of a trial's params (num_splits HEURISTIC_SPLITS ↔ None), or None for a trial without them."""
    if not all(name in params for name in PARAMS):
        return None
    return config_from_dict({name: int(params[name]) for name in PARAMS})


def make_storage(url: str | None, heartbeat_interval: int = 10, grace_period: int | None = None) -> BaseStorage:
    """In-memory storage (one process) for None; otherwise RDB storage with heartbeats on `url`."""
    if url is None:
        return optuna.storages.InMemoryStorage()
    from .db import normalize_url

    url = normalize_url(url)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                          grace_period=grace_period or grace_period_s(heartbeat_interval))  # fmt: skip


def grace_period_s(heartbeat_interval: int) -> int:
    """How long a missing heartbeat is tolerated: three intervals, so a loaded machine's late beat is no death."""
    return 3 * heartbeat_interval


class ScreenedSampler(optuna.samplers.BaseSampler):
    """Multivariate TPE (seeded) proposes `batch` configs; those outside the feasible space or already tried are
    dropped, and the one the cost model predicts fastest becomes the trial's config. Before TPE has enough
    history, random feasible configs are screened the same way. Enqueued trials keep their fixed params."""

    def __init__(self, choices: Mapping[str, Sequence[int]], configs: Sequence[TileConfig],
                 predicted_us: Mapping[TileConfig, float], seed: int = 0, batch: int = 8,
                 firsts: Sequence[TileConfig] = ()) -> None:  # fmt: skip
        self._firsts = tuple(firsts)
        self._space: dict[str, BaseDistribution] = {n: CategoricalDistribution(tuple(choices[n])) for n in PARAMS}
        self._configs = tuple(configs)
        self._feasible = frozenset(configs)
        self._predicted = dict(predicted_us)
        self._rng = random.Random(seed)
        self._batch = batch
        self._tpe = optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=4)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:  # fmt: skip
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}
        tried = {c for t in study.get_trials(deepcopy=False) if (c := config_of(t.params)) is not None}
        untried_firsts = [c for c in self._firsts if c not in tried]
        if untried_firsts:
            return config_to_dict(untried_firsts[0])
        proposals = []
        for _ in range(self._batch):
            params = self._tpe.sample_relative(study, trial, search_space)
            config = config_of(params) if params else self._rng.choice(self._configs)
            if config in self._feasible and config not in tried:
                proposals.append(config)
        if not proposals:  # TPE keeps proposing tried configs: take the best-predicted untried one
            proposals = [c for c in self._configs if c not in tried][:1] or [self._rng.choice(self._configs)]
        best = min(proposals, key=lambda c: self._predicted.get(c, math.inf))
        return config_to_dict(best)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:  # fmt: skip
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)


@contextmanager
def heartbeat(storage: BaseStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval while the body runs (a no-op for storages without one)."""
    interval = storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) else None
    if not interval or not isinstance(storage, BaseHeartbeat):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)  # before the body: a trial that dies at once must still go stale

    thread = threading.Thread(target=beat, name=f"tilefuse-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose worker stopped heartbeating (no-op without heartbeats)."""
    storage = study._storage  # Optuna wraps RDBStorage in a cache; both implement BaseHeartbeat
    if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def settle(study: optuna.Study, timeout_s: float) -> int:
    """Wait (up to `timeout_s`) until no trial is RUNNING, failing stale ones; returns how many still run."""
    deadline = time.monotonic() + timeout_s
    while True:
        fail_stale(study)
        running = sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
        if running == 0 or time.monotonic() >= deadline:
            return running
        time.sleep(0.5)


def is_attempt(trial: FrozenTrial) -> bool:
    """A measurement that ran or is running (not a pruned duplicate, not a trial whose worker died)."""
    return trial.state == TrialState.RUNNING or "status" in trial.user_attrs


@dataclass(frozen=True)
class StopRule:
    budget: int
    patience: int
    space_size: int

    def done(self, trials: Sequence[FrozenTrial]) -> bool:
        attempts = [t for t in trials if is_attempt(t)]
        if len(attempts) >= min(self.budget, self.space_size):
            return True
        done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
        best, since = math.inf, 0
        for t in done:
            value = float(t.value if t.value is not None else math.inf)
            since = 0 if value < best * (1 - MIN_IMPROVEMENT) else since + 1
            best = min(best, value)
        return since >= self.patience


SUGGEST_WAIT_S = 10.0  # how long a trial waits for earlier trials to finish suggesting before it decides


def _duplicate_of(study: optuna.Study, trial: optuna.Trial, config: TileConfig) -> int | None:
    """The number of an earlier trial that measures (or measured) `config`, else None. The earliest trial of a
    config wins. Earlier trials still suggesting (running, no "worker" attribute yet: their params are not all
    stored) are waited for, up to SUGGEST_WAIT_S, or two workers could both measure a config: the later one
    checking before the earlier one's params land, the earlier one never yielding to a later one."""
    deadline = time.monotonic() + SUGGEST_WAIT_S
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        suggesting = [t for t in earlier if t.state == TrialState.RUNNING and "worker" not in t.user_attrs]
        if not suggesting or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for other in earlier:
        if config_of(other.params) == config and is_attempt(other):
            return other.number
    return None


def safe_measure(measure: MeasureFn, spec: Spec, config: TileConfig) -> Measurement:
    """`measure(spec, config)`, with any exception recorded as an "error" measurement."""
    try:
        result = measure(spec, config)
    except Exception as err:  # a failing config is data, never fatal to the search
        log.debug("measuring %s failed", config, exc_info=True)
        return Measurement("error", error=f"{type(err).__name__}: {err}"[:500])
    if not isinstance(result, Measurement):
        return Measurement("error", error=f"measure returned {type(result).__name__}, not a Measurement")
    return result


@dataclass(frozen=True)
class SearchJob:
    """What every worker of one study needs: the Spec and the kernel family measured, the knob choices, the feasible
    configs with their predicted latencies (computed once, so all workers screen alike), and when to stop.
    JSON-serializable for subprocesses."""

    spec: Spec
    choices: dict[str, tuple[int, ...]]
    configs: tuple[TileConfig, ...]
    predicted_us: dict[TileConfig, float]
    budget: int
    patience: int
    seed: int = 0
    firsts: tuple[TileConfig, ...] = ()  # proposed before anything else, in order
    kind: str = "attention"  # the kernel family (codegen.families.KERNEL_FAMILIES)

    def sampler(self, seed: int) -> ScreenedSampler:
        return ScreenedSampler(self.choices, self.configs, self.predicted_us, seed=seed, firsts=self.firsts)

    @property
    def stop_rule(self) -> StopRule:
        return StopRule(self.budget, self.patience, len(self.configs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(), "choices": {k: list(v) for k, v in self.choices.items()},
            "configs": [config_to_dict(c) for c in self.configs],
            "predicted_us": [_finite(self.predicted_us.get(c, math.inf)) for c in self.configs],
            "budget": self.budget, "patience": self.patience, "seed": self.seed,
            "firsts": [config_to_dict(c) for c in self.firsts], "kind": self.kind,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchJob:
        from tilefuse.specs import spec_from_dict

        configs = tuple(config_from_dict(c) for c in data["configs"])
        predicted = {
            c: (math.inf if p is None else float(p)) for c, p in zip(configs, data["predicted_us"], strict=True)
        }
        choices = {str(k): tuple(int(x) for x in v) for k, v in data["choices"].items()}
        firsts = tuple(config_from_dict(c) for c in data.get("firsts", ()))
        kind = str(data.get("kind", "attention"))
        return cls(spec_from_dict(data["spec"]), choices, configs, predicted, int(data["budget"]),
                   int(data["patience"]), int(data.get("seed", 0)), firsts, kind)  # fmt: skip


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run_worker(study: optuna.Study, job: SearchJob, measure: MeasureFn, worker: str = "0") -> int:
    """Ask, measure, tell until the job's stop rule says done; returns how many configs this worker measured."""
    measured, stop, feasible, spec = 0, job.stop_rule, frozenset(job.configs), job.spec
    while True:
        fail_stale(study)
        if stop.done(study.get_trials(deepcopy=False)):
            return measured
        with warnings.catch_warnings():  # Optuna prefers optimize() with heartbeats; ask/tell is on purpose here
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        config = config_from_dict({n: int(trial.suggest_categorical(n, job.choices[n])) for n in PARAMS})
        trial.set_user_attr("worker", worker)
        duplicate = _duplicate_of(study, trial, config)
        if duplicate is not None:
            trial.set_user_attr("duplicate_of", duplicate)
            study.tell(trial, state=TrialState.PRUNED)
            continue
        if config not in feasible:
            result = Measurement("infeasible", error="outside the feasible space")
        else:
            with heartbeat(study._storage, trial._trial_id):
                result = safe_measure(measure, spec, config)
            measured += 1
        _tell(study, trial, result)


def _tell(study: optuna.Study, trial: optuna.Trial, result: Measurement) -> None:
    try:
        _tell_result(study, trial, result)
    except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it as stale while we measured
        stored = study._storage.get_trial(trial._trial_id)
        if stored.user_attrs.get("status") == result.status and stored.state != TrialState.RUNNING:
            return  # the tell went through before the error: nothing was lost
        log.warning("trial %d was failed as stale while it ran (heartbeats too slow?); recording %s as a new trial",
                    trial.number, result.status)  # fmt: skip
        ok = result.status == "ok"
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE if ok else TrialState.FAIL, value=result.median_us if ok else None,
            params=trial.params, distributions=trial.distributions,
            user_attrs={**trial.user_attrs, "status": result.status, "latency_us": dict(result.latency_us),
                        **({"error": result.error[:500]} if result.error else {})},
        ))  # fmt: skip


def _tell_result(study: optuna.Study, trial: optuna.Trial, result: Measurement) -> None:
    trial.set_user_attr("status", result.status)
    trial.set_user_attr("latency_us", dict(result.latency_us))
    if result.error:
        trial.set_user_attr("error", result.error[:500])
    if result.status == "ok":
        study.tell(trial, result.median_us)
    else:
        study.tell(trial, state=TrialState.FAIL)


def trials_of(study: optuna.Study, predicted_us: Mapping[TileConfig, float]) -> list[Trial]:
    """Every measurement attempt of the study as a Trial (a worker that died mid-trial gives status "error")."""
    out = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        config = config_of(t.params)
        if config is None or "duplicate_of" in t.user_attrs:
            continue
        status = str(t.user_attrs.get("status", "error"))
        error = t.user_attrs.get("error") or (None if "status" in t.user_attrs else f"trial {t.state.name.lower()}: "
                                              "the worker stopped heartbeating (died mid-measurement)")  # fmt: skip
        latency = {str(k): float(v) for k, v in dict(t.user_attrs.get("latency_us") or {}).items()}
        out.append(Trial(config, status, latency, predicted_us.get(config), error))
    return out
