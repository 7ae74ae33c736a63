"""`tilefuse tune` on the demo preset in model mode, `tilefuse db ...`, and the compile-time lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tilefuse.autotune import registry
from tilefuse.autotune.db import TuningDB
from tilefuse.compiler import cli
from tilefuse.compiler.presets import load_model


def _tune(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    db = str(tmp_path / "t.sqlite")
    code = cli.main(["tune", "demo", "--mode", "model", "--db", db, "--json", "--out", str(tmp_path / "out"), *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_tune_demo_in_model_mode_reports_every_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _tune(tmp_path, capsys)
    sites = report["sites"]
    assert isinstance(sites, list) and {s["kind"] for s in sites} >= {"attention", "rmsnorm"}
    kernels = {s["kernel"] for s in sites}
    assert kernels >= {"attention", "attention_backward", "norm", "norm_backward"}, kernels
    assert all(s["error"] is None for s in sites)
    attention = next(s for s in sites if s["kernel"] == "attention")
    assert attention["best"] and attention["best_predicted_us"] > 0 and attention["speedup_over_default"] >= 1.0
    assert attention["spec"]["dtype"] == "bfloat16" and not attention["hit"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["sites"] == sites
    again = _tune(tmp_path, capsys)
    assert all(s["hit"] for s in again["sites"])  # type: ignore[union-attr]


def test_tune_family_restricts_the_kernels(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: no wrapped cells
    report = _tune(tmp_path, capsys, "--family", "norm_backward", "--family", "rope")
    assert {s["kernel"] for s in report["sites"]} <= {"norm_backward", "rope"}  # type: ignore[union-attr]
    assert "norm_backward" in {s["kernel"] for s in report["sites"]}  # type: ignore[union-attr]
    db = str(tmp_path / "t.sqlite")
    assert cli.main(["tune", "demo", "--mode", "model", "--db", db, "--family", "norm"]) == 0
    table = capsys.readouterr().out
    assert "kernel" in table and "norm" in table
    assert cli.main(["db", "list", "--db", db, "--family", "norm_backward", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed and {r["key"]["family"] for r in listed} == {"norm_backward"}
    assert cli.main(["db", "list", "--db", db]) == 0
    assert "norm_backward" in capsys.readouterr().out
    assert cli.main(["db", "show", listed[0]["key_digest"][:12], "--db", db]) == 0
    assert "kernel norm_backward" in capsys.readouterr().out.replace("\n", " ")


def test_db_list_show_export_import_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tune(tmp_path, capsys)
    db = str(tmp_path / "t.sqlite")
    assert cli.main(["db", "list", "--db", db, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) >= 2
    assert cli.main(["db", "show", listed[0]["key_digest"][:10], "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key_digest"] == listed[0]["key_digest"]
    export = tmp_path / "export.json"
    assert cli.main(["db", "export", str(export), "--db", db]) == 0
    other = str(tmp_path / "other.sqlite")
    assert cli.main(["db", "import", str(export), "--db", other]) == 0
    assert len(TuningDB(other).records()) == len(listed)
    assert cli.main(["db", "clear", "--db", other]) == 0
    assert TuningDB(other).records() == []
    assert cli.main(["db", "show", "ffff", "--db", other]) == 2


def test_db_command_on_a_corrupt_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"\x00garbage" * 100)
    assert cli.main(["db", "list", "--db", str(bad)]) == 1
    assert "not an SQLite database" in capsys.readouterr().err.replace("\n", " ")
    assert cli.main(["db", "clear", "--recover", "--db", str(bad)]) == 0
    assert TuningDB(bad).records() == []


def test_tune_measure_mode_without_gpu_fails_per_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["tune", "demo", "--mode", "measure", "--db", str(tmp_path / "t.sqlite"), "--json"])
    report = json.loads(capsys.readouterr().out)
    errors = [s["error"] for s in report["sites"] if s.get("error")]
    assert code == 1 and errors and all("needs a CUDA GPU" in e for e in errors)


def test_compile_looks_up_the_db_and_fills_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("TILEFUSE_GPU", "h100")
    db = str(tmp_path / "t.sqlite")
    model, inputs = load_model("demo", batch=2, seq=16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="tilefuse", options={"inner": "eager", "autotune": "db", "tuning_db": db})
    with torch.no_grad():
        compiled(*inputs)
    chosen = registry.snapshot()
    # A miss: the cost model's choice; the two norm sites differ only in what their backward kernel ignores, so
    # the second one's backward finds the first one's choice stored back.
    misses = {kind: c.source for (_, kind), c in chosen.items() if kind != "norm_backward"}
    assert misses and set(misses.values()) == {"model"}
    assert {kind for _, kind in chosen} >= {"attention", "attention_backward", "norm", "norm_backward"}
    spec, kind = next(iter(chosen))
    assert registry.config_for(spec, kind) == chosen[(spec, kind)].config
    assert TuningDB(db).records()  # stored back: the next compile is a hit
    registry.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="tilefuse", options={"inner": "eager", "tuning_db": db})(*inputs)
    assert {c.source for c in registry.snapshot().values()} == {"db"}


def test_autotune_off_leaves_the_registry_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEFUSE_GPU", "h100")
    model, inputs = load_model("demo", batch=2, seq=16)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="tilefuse", options={"inner": "eager", "autotune": "off"})(*inputs)
    assert registry.snapshot() == {}
