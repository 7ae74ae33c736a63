"""The benchmark harness end to end on CPU at tiny sizes: every suite runs in-process, its result follows the JSON
schema, and a contender whose output fails the reference check is recorded as failed and never timed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tilefuse.benchmarks import run as bench
from tilefuse.benchmarks import suite_decode, suite_tuning
from tilefuse.benchmarks.harness import STATUSES, Case, Context, Unavailable, max_rel_error, run_case

RESULT_KEYS = {"schema", "suite", "metric", "x_axis", "config", "env", "elapsed_s", "partial", "notes", "records"}
RECORD_KEYS = {"suite", "case", "params", "contender", "status", "reason", "median_ms", "p20_ms", "p80_ms", "timing",
               "max_rel_err", "tolerance", "metrics", "best_peer", "speedup_vs_best_peer"}  # fmt: skip
TIMED_SUITES = ("attention", "decode", "norms", "e2e")


def _ctx(**kwargs: Any) -> Context:
    return Context(torch.device("cpu"), tiny=True, **{"repeats": 2, **kwargs})


def check_schema(result: dict[str, Any]) -> None:
    assert set(result) == RESULT_KEYS
    json.dumps(result)  # serializable as is
    assert result["env"]["torch"] == torch.__version__ and result["env"]["date"]
    assert result["records"], "a suite must produce records"
    for record in result["records"]:
        assert set(record) == RECORD_KEYS
        assert record["status"] in STATUSES
        if record["status"] != "ok":
            assert record["median_ms"] is None and isinstance(record["reason"], str)
        elif result["suite"] in TIMED_SUITES:
            assert record["median_ms"] > 0 and record["max_rel_err"] <= record["tolerance"]


# ------------------------------------------------------------------------------------------------ harness
def test_failed_check_is_recorded_not_timed() -> None:
    ref = torch.ones(8, dtype=torch.float64)
    calls = {"good": 0, "bad": 0}

    def counted(name: str, value: float) -> Any:
        def run() -> torch.Tensor:
            calls[name] += 1
            return torch.full((8,), value)

        return run

    def missing() -> Any:
        raise Unavailable("not installed here")

    def broken() -> Any:
        def run() -> torch.Tensor:
            raise RuntimeError("kernel exploded")

        return run

    case = Case("toy", {"n": 8}, lambda: ref,
                {"good": lambda: counted("good", 1.0), "bad": lambda: counted("bad", 2.0), "missing": missing,
                 "broken": broken}, tolerance=1e-3, work={"flops": 8.0})  # fmt: skip
    records = {r.contender: r for r in run_case("toy", case, _ctx(repeats=3))}
    assert records["bad"].status == "check_failed" and records["bad"].median_ms is None
    assert records["bad"].max_rel_err == pytest.approx(1.0)
    assert calls["bad"] == 1, "a contender that failed its check must not be timed"
    assert records["good"].status == "ok" and records["good"].median_ms is not None
    assert calls["good"] == 1 + 3 + 3  # check, 3 warm-up calls, 3 timed rounds
    assert records["good"].metrics["tflops"] > 0
    assert records["missing"].status == "unavailable" and records["missing"].reason == "not installed here"
    assert records["broken"].status == "error" and "kernel exploded" in str(records["broken"].reason)


def test_max_rel_error_flags_shape_and_nan() -> None:
    ref = torch.ones(4, dtype=torch.float64)
    assert max_rel_error(torch.ones(4), ref) == 0.0
    assert max_rel_error(torch.ones(5), ref) == float("inf")
    assert max_rel_error(torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref) == float("inf")
    assert max_rel_error((torch.ones(4),), (ref, ref)) == float("inf")


# ------------------------------------------------------------------------------------------------- suites
def test_attention_suite_tiny() -> None:
    cases = r"^fwd(\+bwd)? bf16 d64 N64 (causal|softcap)$"
    ctx = _ctx(contenders=frozenset({"tilefuse", "sdpa", "eager"}), case_filter=cases)
    result = bench.run_suite("attention", ctx)
    check_schema(result)
    records = {(r["case"], r["contender"]): r for r in result["records"]}
    assert len(records) == 12
    assert records[("fwd bf16 d64 N64 softcap", "sdpa")]["status"] == "unavailable"
    assert records[("fwd+bwd bf16 d64 N64 causal", "tilefuse")]["status"] == "ok"
    assert records[("fwd bf16 d64 N64 causal", "tilefuse")]["speedup_vs_best_peer"] > 0


def test_decode_suite_tiny() -> None:
    result = bench.run_suite("decode", _ctx(contenders=frozenset({"tilefuse", "sdpa"}), case_filter="q4 kv64$"))
    check_schema(result)
    assert {r["status"] for r in result["records"]} == {"ok"}
    assert all(r["metrics"]["gbps"] > 0 for r in result["records"])


def test_norms_suite_tiny_has_copy_yardstick() -> None:
    ctx = _ctx(contenders=frozenset({"tilefuse", "liger", "eager"}), case_filter=r"^fwd(\+bwd)? rmsnorm\+residual ")
    result = bench.run_suite("norms", ctx)
    check_schema(result)
    by_contender = {(r["contender"], r["params"]["mode"]): r for r in result["records"]}
    assert by_contender[("copy", "copy")]["metrics"]["gbps"] > 0
    assert by_contender[("liger", "fwd")]["status"] == "unavailable"  # Triton kernels need CUDA
    assert by_contender[("tilefuse", "fwd+bwd")]["metrics"]["copy_fraction"] > 0


def test_io_suite() -> None:
    result = bench.run_suite("io", _ctx())
    check_schema(result)
    attention = [r for r in result["records"] if r["case"].startswith("attention")]
    assert all(r["status"] == "ok" and r["metrics"]["fused_over_bound"] >= 1.0 for r in attention)


@pytest.mark.hf
def test_e2e_suite_tiny() -> None:
    pytest.importorskip("transformers")
    ctx = _ctx(contenders=frozenset({"tilefuse", "eager"}), case_filter="^prefill", inner="eager")
    result = bench.run_suite("e2e", ctx)
    check_schema(result)
    assert {r["contender"]: r["status"] for r in result["records"]} == {"tilefuse": "ok", "eager": "ok"}
    assert all(r["metrics"]["tokens_per_s"] > 0 for r in result["records"])


@pytest.mark.hf
def test_compile_suite_tiny() -> None:
    pytest.importorskip("transformers")
    ctx = _ctx(contenders=frozenset({"tilefuse"}), case_filter="^compile 2 layers$", inner="eager")
    result = bench.run_suite("compile", ctx)
    check_schema(result)
    (record,) = result["records"]
    assert record["status"] == "ok" and record["metrics"]["passes_s"] > 0
    assert record["params"]["sites"]["attention"]["fused"] == 2


def test_tuning_suite_without_tune_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite_tuning, "tune_available", lambda: False)
    result = bench.run_suite("tuning", _ctx())
    check_schema(result)
    assert [r["status"] for r in result["records"]] == ["unavailable"]


def test_main_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["io", "--tiny", "--out", str(tmp_path), "--json", "--filter", "d64 N128"]) == 0
    written = json.loads((tmp_path / "io-tiny.json").read_text())
    check_schema(written)
    assert json.loads(capsys.readouterr().out)["suite"] == "io"
    table = (tmp_path / "io-tiny.md").read_text()
    assert "attention bf16 d64 N128 causal" in table and "| case |" in table


def test_interrupted_run_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed mid-suite (a GPU lease's time limit) leaves a partial JSON after every case; --resume keeps
    those cases and measures only the rest."""
    args = [
        "decode",
        "--tiny",
        "--out",
        str(tmp_path),
        "--contenders",
        "tilefuse,sdpa",
        "--filter",
        "q1 ",
        "--repeats",
        "2",
    ]
    measured: list[str] = []

    def killed_after_first_case(suite: str, case: Case, ctx: Context) -> Any:
        if measured:
            raise KeyboardInterrupt  # what the time limit's SIGINT/SIGTERM does to the run
        measured.append(case.name)
        return run_case(suite, case, ctx)

    monkeypatch.setattr(suite_decode, "run_case", killed_after_first_case)
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    first = measured[0]
    partial = json.loads((tmp_path / "decode-tiny.json").read_text())
    assert partial["partial"] and {r["case"] for r in partial["records"]} == {first}
    assert not (tmp_path / "decode-tiny.md").exists()  # tables only for finished suites

    measured.clear()
    monkeypatch.setattr(suite_decode, "run_case", lambda s, c, x: measured.append(c.name) or run_case(s, c, x))
    assert bench.main([*args, "--resume"]) == 0
    done = json.loads((tmp_path / "decode-tiny.json").read_text())
    check_schema(done)
    assert not done["partial"] and first not in measured and len(measured) == 1
    assert sorted({r["case"] for r in done["records"]}) == sorted([first, *measured])
    assert len(done["records"]) == 4 and any(note.startswith("resumed: 1 cases") for note in done["notes"])
    assert (tmp_path / "decode-tiny.md").exists()
    assert bench.main([*args, "--resume"]) == 0 and len(measured) == 3  # a finished file is measured again


def test_main_refuses_full_size_gpu_suites_on_cpu(tmp_path: Path) -> None:
    assert bench.main(["attention", "--device", "cpu", "--out", str(tmp_path)]) == 2


def test_tilefuse_bench_writes_a_plot(tmp_path: Path) -> None:
    """`tilefuse bench` is benchmarks/run.py; with matplotlib (the `plot` extra, installed by `make test`) the
    io suite's bytes-vs-N lines become a PNG."""
    pytest.importorskip("matplotlib")
    from tilefuse.compiler.cli import main as cli_main

    assert cli_main(["bench", "io", "--tiny", "--out", str(tmp_path), "--filter", "^attention"]) == 0
    png = (tmp_path / "io-tiny.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_rope_cases_time_the_prepass_alternative_outside_the_peers() -> None:
    """RoPE cases add `tilefuse_prepass` (RoPE as its own passes); it is checked like any contender, but neither it
    nor `tilefuse` counts the other as its best peer."""
    ctx = _ctx(contenders=frozenset({"tilefuse", "tilefuse_prepass", "eager"}), case_filter="^fwd bf16 d64 N64 rope$")
    result = bench.run_suite("attention", ctx)
    check_schema(result)
    records = {r["contender"]: r for r in result["records"]}
    assert set(records) == {"tilefuse", "tilefuse_prepass", "eager"}
    assert all(r["status"] == "ok" for r in records.values())
    assert records["tilefuse"]["best_peer"] == records["tilefuse_prepass"]["best_peer"] == "eager"
    plain = bench.run_suite("attention", _ctx(contenders=ctx.contenders, case_filter="^fwd bf16 d64 N64 causal$"))
    assert {r["contender"] for r in plain["records"]} == {"tilefuse", "eager"}


# ------------------------------------------------------------------------------- ecosystem and workflow checks
def _ecosystem_run(**site: Any) -> dict[str, Any]:
    """One inference run of the survey (benchmarks/ecosystem.py) as `measure` records it, with one rmsnorm row."""
    rmsnorm = {"expected": 4, "found": 4, "fused": 4, "declined": {}, **site}
    return {"fallbacks": [], "sites": {"rmsnorm": rmsnorm}, "executed": {"tilefuse::rms_norm": rmsnorm["fused"]},
            "out_diff": 0.0, "out_scale": 1.0}  # fmt: skip


def test_ecosystem_problems_count_the_model_sites_apart_from_look_alikes() -> None:
    """A declined look-alike makes the report's count match the model's: the site it stands in for is still told
    missing, besides the decline; a fully fused model has no problem."""
    from tilefuse.benchmarks import ecosystem

    assert ecosystem.problems(_ecosystem_run()) == []
    found = ecosystem.problems(_ecosystem_run(fused=3, declined={"not a norm: mean over axis 1": 1}))
    assert "rmsnorm: 1 of 4 sites neither fused nor truly declined (4 in the report)" in found
    assert "rmsnorm: 1 declined: not a norm: mean over axis 1" in found
    extra = ecosystem.problems(_ecosystem_run(found=5, fused=5))
    assert extra == ["rmsnorm: the report lists 5 sites, the model holds 4"]


def test_workflow_grad_diff_flags_a_gradient_one_twin_lacks() -> None:
    """harness.grad_diff (ecosystem and workflows): 0 for twins given the same weighted loss, inf when one side has
    a gradient the other lacks."""
    import copy

    from tilefuse.benchmarks.harness import grad_diff, perturbed, weighted_loss

    torch.manual_seed(0)
    model = perturbed(torch.nn.LayerNorm(8))
    twin, x = copy.deepcopy(model), torch.randn(3, 8)
    weighted_loss([model(x)]).backward()
    weighted_loss([twin(x)]).backward()
    worst, scale = grad_diff(twin, model)
    assert worst == 0.0 and scale > 0.0
    twin.bias.grad = None
    assert grad_diff(twin, model)[0] == float("inf")
