"""benchmarks/gpu_session.py: the plan runner for short GPU leases, exercised on CPU with a small plan."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

from tilefuse.benchmarks import gpu_session
from tilefuse.benchmarks.gpu_session import Step

SLEEP = (sys.executable, "-c", "import time; time.sleep(60)")


def _small_plan(gpu: str, collect_jobs: int, root: Path = gpu_session.REPO) -> list[Step]:
    bench = ("decode", "--tiny", "--contenders", "tilefuse,sdpa", "--filter", "q1 kv64$", "--repeats", "2")
    return [
        Step("ok", "a command that finishes", 60, command=(sys.executable, "-c", "print('hello')"), marker="ok.done"),
        Step("bench", "a tiny benchmark", 300, bench=bench),
        Step("slow", "outlives its cap", 2, command=(sys.executable, "-c", "import time; time.sleep(60)"),
             marker="slow.done"),
        Step("failing", "exits 3", 60, command=(sys.executable, "-c", "raise SystemExit(3)"), marker="failing.done"),
        Step("slow-once", "outlives its cap, not retried", 2, command=SLEEP, marker="slow-once.done", once=True),
    ]  # fmt: skip


def _run(tmp_path: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "out"
    assert gpu_session.main(["--out", str(out), "--root", str(tmp_path / "repo"), "--gpu", "testgpu", *extra]) == 0
    return json.loads((out / gpu_session.SUMMARY).read_text())  # type: ignore[no-any-return]


def test_runs_the_plan_packs_results_and_skips_finished_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_session, "plan", _small_plan)
    first = _run(tmp_path, "--budget", "600")
    states = {s["step"]: s["state"] for s in first["steps"]}
    assert states == {"ok": "done", "bench": "done", "slow": "stopped at its time limit", "failing": "failed (exit 3)",
                      "slow-once": "stopped at its time limit"}  # fmt: skip

    with tarfile.open(tmp_path / "out" / gpu_session.ARCHIVE) as tar:
        names = set(tar.getnames())
    results = "benchmarks/results/testgpu"
    assert {f"{results}/decode-tiny.json", f"{results}/decode-tiny.md", f"{results}/ok.done",
            f"{results}/logs/slow.log", f"{results}/{gpu_session.SUMMARY}"} <= names  # fmt: skip
    assert f"{results}/slow.done" not in names and f"{results}/failing.done" not in names
    assert "hello" in (tmp_path / "repo" / results / "logs" / "ok.log").read_text()

    again = _run(tmp_path, "--budget", "600", "--only", "ok,bench,slow,slow-once")
    assert [(s["step"], s["state"]) for s in again["steps"]] == [
        ("ok", "done earlier"), ("bench", "done earlier"), ("slow", "stopped at its time limit"),
        ("slow-once", "done earlier"),
    ]  # fmt: skip


def test_steps_are_not_started_without_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_session, "plan", _small_plan)
    summary = _run(tmp_path, "--budget", "30")
    assert {s["state"] for s in summary["steps"]} == {"not started: out of time"}
    assert (tmp_path / "out" / gpu_session.ARCHIVE).exists()


def test_the_real_plan_puts_correctness_first_and_collection_last() -> None:
    steps = gpu_session.plan("nvidia-h100", 4)
    assert steps[0].name == "gpu-tests" and steps[0].env["TRITON_INTERPRET"] == "0"
    assert steps[-1].name == "collect" and steps[-1].cap_s == float("inf")
    tags = [s.bench[s.bench.index("--tag") + 1] for s in steps if "--tag" in s.bench]
    assert len(tags) == len(set(tags)), "two steps would write the same result file"
    assert all(s.cap_s <= 420 for s in steps[:-1])


def test_unknown_step_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        gpu_session.main(["--out", str(tmp_path), "--root", str(tmp_path), "--gpu", "x", "--only", "nope"])
