"""Per-site IO report: the fused kernel moves fewer bytes than the unfused graph and no fewer than the bound."""

from __future__ import annotations

import json

import pytest
import torch

import tilefuse
from tilefuse.codegen.io_report import io_report
from tilefuse.compiler.cli import main
from tilefuse.compiler.presets import load_model


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def test_attention_sites_beat_unfused_and_respect_the_bound() -> None:
    model, inputs = load_model("demo", seq=64)
    rows = io_report(tilefuse.explain(model, inputs).sites)
    attention = [r for r in rows if r.kind == "attention"]
    assert len(attention) == 2
    assert not [r for r in rows if r.kind == "rope"]  # absorbed into attention: no bytes of their own
    for r in attention:
        assert r.lower_bound_bytes is not None and r.unfused_bytes is not None
        assert r.lower_bound_bytes <= r.fused_bytes < r.unfused_bytes
    for r in rows:
        if r.kind == "rmsnorm":
            assert r.unfused_bytes is not None and r.fused_bytes < r.unfused_bytes


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["io-report", "demo", "--seq", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "demo" and {r["kind"] for r in report["sites"]} >= {"attention", "rmsnorm"}
