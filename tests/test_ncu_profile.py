"""benchmarks/ncu_profile.py: reading Nsight Compute's CSV, the limiter verdict, and the profiling run mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tilefuse.benchmarks import gpu_session, ncu_profile, suite_attention, suite_decode, suite_norms
from tilefuse.benchmarks import run as bench
from tilefuse.benchmarks.harness import Context

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')  # fmt: skip


def _row(launch: int, kernel: str, section: str, metric: str, unit: str, value: str) -> str:
    fields = [str(launch), "4242", "python3", "127.0.0.1", kernel, "1", "7", "(256, 1, 1)", "(64, 16, 1)", "0", "9.0",
              section, metric, unit, value]  # fmt: skip
    return ",".join(f'"{f}"' for f in fields)


SOL = "GPU Speed Of Light Throughput"
CSV = "\n".join([
    "==PROF== Connected to process 4242",
    HEADER,
    _row(0, "_attn_fwd", SOL, "Duration", "msecond", "1.50"),
    _row(0, "_attn_fwd", SOL, "Compute (SM) Throughput", "%", "81.20"),
    _row(0, "_attn_fwd", SOL, "Memory Throughput", "%", "22.10"),
    _row(0, "_attn_fwd", "Occupancy", "Achieved Occupancy", "%", "12.40"),
    _row(0, "_attn_fwd", "Launch Statistics", "Registers Per Thread", "register/thread", "192"),
    _row(0, "_attn_fwd", "Launch Statistics", "Grid Size", "", "1,024"),
    _row(1, "_mask_list", SOL, "Duration", "usecond", "1,500.00"),
    _row(1, "_mask_list", SOL, "Compute (SM) Throughput", "%", "10.0"),
    _row(1, "_mask_list", SOL, "Memory Throughput", "%", "30.0"),
])  # fmt: skip


def test_details_csv_becomes_one_entry_per_launch() -> None:
    kernels = ncu_profile.parse_details_csv(CSV)
    assert [k["kernel"] for k in kernels] == ["_attn_fwd", "_mask_list"]
    first = kernels[0]
    assert first["metrics"] == {"duration": 1500.0, "sm_throughput_pct": 81.2, "memory_throughput_pct": 22.1,
                                "achieved_occupancy_pct": 12.4, "registers_per_thread": 192.0}  # fmt: skip
    assert first["all"]["Launch Statistics / Grid Size"] == [1024.0, ""]
    assert kernels[1]["metrics"]["duration"] == 1500.0  # µs either way


def test_summary_names_the_main_kernel_and_its_limiter() -> None:
    summary = ncu_profile.summarize(ncu_profile.parse_details_csv(CSV))
    assert summary["total_duration_us"] == 3000.0 and summary["main_kernel"] == "_attn_fwd"
    assert summary["limiter"].startswith("compute (SM pipes)-bound: SM 81% / memory 22%")
    assert summary["kernels"][1]["limiter"].startswith("latency-bound")
    assert summary["kernels"][0]["share_of_time"] == 0.5


@pytest.mark.parametrize(("sm", "mem", "verdict"), [(20.0, 92.0, "memory-bound"), (61.0, 60.5, "compute"),
                                                    (30.0, 40.0, "latency-bound")])  # fmt: skip
def test_limiter(sm: float, mem: float, verdict: str) -> None:
    assert ncu_profile.limiter({"sm_throughput_pct": sm, "memory_throughput_pct": mem}).startswith(verdict)
    assert ncu_profile.limiter({}).startswith("unknown")


def test_csv_without_header_is_an_error() -> None:
    with pytest.raises(ValueError, match="no ncu CSV header"):
        ncu_profile.parse_details_csv("==WARNING== No kernels were profiled.")


def test_targets_and_merge(tmp_path: Path) -> None:
    assert ncu_profile.parse_target("attention/fwd bf16 d128 N8192 causal@tilefuse, flex", "x") == (
        "attention", "fwd bf16 d128 N8192 causal", ["tilefuse", "flex"])  # fmt: skip
    assert ncu_profile.parse_target("norms/fwd rmsnorm 16384x4096", "tilefuse")[2] == ["tilefuse"]
    with pytest.raises(ValueError, match="SUITE/CASE"):
        ncu_profile.parse_target("fwd bf16", "tilefuse")
    path = tmp_path / "profile.json"
    ncu_profile.merge(path, [{"case": "a", "contender": "x", "status": "error"}], {"host": "one"})
    ncu_profile.merge(path, [{"case": "b", "contender": "x", "status": "ok"}], {"host": "one"})
    doc = ncu_profile.merge(path, [{"case": "a", "contender": "x", "status": "ok"}], {"host": "two"})
    assert [(p["case"], p["status"]) for p in doc["profiles"]] == [("b", "ok"), ("a", "ok")]
    assert json.loads(path.read_text())["env"] == {"host": "two"}


def test_missing_ncu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ncu_profile.shutil, "which", lambda name: None)
    monkeypatch.setattr(ncu_profile, "glob", lambda pattern: [])
    with pytest.raises(FileNotFoundError, match="ncu"):
        ncu_profile.find_ncu()
    assert ncu_profile.main(["attention/fwd bf16 d64 N64 causal", "--out", str(tmp_path)]) == 2


def test_profile_mode_runs_the_contender_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = suite_decode.builders

    def counting_builders(*args: object, **kwargs: object) -> dict:  # type: ignore[type-arg]
        built = real(*args, **kwargs)  # type: ignore[arg-type]
        return {name: (lambda n=name, b=build: calls.append(n) or b()) for name, build in built.items()}

    monkeypatch.setattr(suite_decode, "builders", counting_builders)
    argv = [
        "decode",
        "--tiny",
        "--filter",
        "^decode bf16 d64 q1 kv64$",
        "--profile",
        "tilefuse",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(argv) == 0
    assert calls == ["tilefuse"] and not list(tmp_path.iterdir())


def test_the_session_profiles_existing_cases() -> None:
    """The gpu_session's profile targets name real cases of the full-size grids (a typo would profile nothing)."""
    ctx = Context(torch.device("cpu"))
    names = {suite_attention.case_name(*point) for point in suite_attention.grid(ctx, False)}
    names |= {suite_norms.case_name(p, backward) for p in suite_norms.problems(ctx) for backward in (False, True)}
    names |= {f"decode bf16 d{p.head_dim} q{p.q_len} kv{p.kv_len}" for p in suite_decode.problems(ctx)}
    for target in gpu_session.PROFILED:
        _, case, contenders = ncu_profile.parse_target(target, "tilefuse")
        assert case in names, case
        assert set(contenders) <= {"tilefuse", "tilefuse_prepass", "flex", "sdpa", "compile", "eager", "liger"}
