"""Many workers on one study: on the embedded default (SQLite) and on a real PostgreSQL server (`.ci/run` starts
one and sets TILEFUSE_TEST_POSTGRES_URL). Three worker processes lose and duplicate no trial; a worker killed
mid-trial has its trial failed by heartbeat and the study still completes its budget."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import optuna
import pytest
from _synthetic import synthetic_latency
from optuna.trial import TrialState

from tilefuse.autotune.db import TuningDB
from tilefuse.autotune.search import TuneOutcome, TuneSettings, tune_spec
from tilefuse.autotune.study import make_storage
from tilefuse.costmodel.hardware import get_gpu
from tilefuse.specs import AttentionSpec

HERE = Path(__file__).parent
SPEC = AttentionSpec(2, 8, 8, 256, 256, 64, 64, "bfloat16", 0.125, causal=True)
BUDGET, WORKERS = 12, 3
POSTGRES_ENV = "TILEFUSE_TEST_POSTGRES_URL"


def _backends(tmp: str) -> list[object]:
    postgres = os.environ.get(POSTGRES_ENV)
    return [
        pytest.param("sqlite", id="embedded-sqlite"),
        pytest.param(postgres, id="postgresql", marks=pytest.mark.skipif(
            not postgres, reason=f"{POSTGRES_ENV} is unset: no PostgreSQL server (.ci/run starts one)")),
    ]  # fmt: skip


def _run(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill: bool) -> tuple[TuneOutcome, Path]:
    log = tmp_path / "measurements.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SYNTHETIC_LOG", str(log))
    monkeypatch.setenv("SYNTHETIC_SLEEP_S", "0.2")
    if kill:
        monkeypatch.setenv("SYNTHETIC_KILL_WORKER", "0")
        monkeypatch.setenv("SYNTHETIC_KILL_AT", "2")
    settings = TuneSettings(
        mode="measure", budget=BUDGET, patience=100, workers=WORKERS, remeasure=0, force=True,
        # Generous heartbeats: a loaded 2-core CI machine must not mistake a slow worker for a dead one.
        measure_target="_synthetic:synthetic_latency", heartbeat_interval=3 if kill else 5,
    )  # fmt: skip
    outcome = tune_spec(SPEC, get_gpu("h100"), settings, db=TuningDB(url), measure=synthetic_latency)
    return outcome, log


def _study(url: str, outcome: TuneOutcome) -> optuna.Study:
    storage = make_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)
             if s.study_name.startswith(f"tilefuse-{outcome.key.digest[:16]}")]  # fmt: skip
    return optuna.load_study(study_name=sorted(names, key=lambda n: -_created(storage, n))[0], storage=storage)


def _created(storage: object, name: str) -> int:
    return optuna.load_study(study_name=name, storage=storage).get_trials()[0]._trial_id  # type: ignore[arg-type]


def _url(backend: str, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tuning.sqlite'}" if backend == "sqlite" else backend


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends(""))
def test_workers_lose_and_duplicate_no_trial(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _url(backend, tmp_path)
    outcome, log = _run(url, tmp_path, monkeypatch, kill=False)
    study = _study(url, outcome)
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    measured = [t for t in trials if "status" in t.user_attrs]
    configs = Counter(tuple(t.params[n] for n in ("block_m", "block_n", "num_warps", "num_stages")) for t in measured)
    assert max(configs.values()) == 1  # no config measured twice, even by two workers at once
    assert BUDGET <= len(measured) <= BUDGET + WORKERS - 1  # every worker checks the budget before it asks
    logged = Counter(tuple(map(int, line.split()[1:])) for line in log.read_text().splitlines())
    assert logged == configs  # every measurement became exactly one trial, and every trial was measured
    assert len({t.user_attrs["worker"] for t in measured}) >= 2  # the work was shared
    assert outcome.record.best is not None


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends(""))
def test_a_killed_worker_fails_its_trial_and_the_study_completes(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _url(backend, tmp_path)
    outcome, _ = _run(url, tmp_path, monkeypatch, kill=True)
    trials = _study(url, outcome).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    dead = [t for t in trials if t.state == TrialState.FAIL and "status" not in t.user_attrs]
    assert len(dead) == 1 and dead[0].user_attrs["worker"] == "0"
    measured = [t for t in trials if "status" in t.user_attrs]
    assert len(measured) >= BUDGET  # the others finished the budget
    died = [t for t in outcome.record.trials if t.error and "heartbeat" in t.error]
    assert len(died) == 1 and died[0].status == "error"  # recorded in the tuning database too
