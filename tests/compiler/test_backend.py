"""Backend behaviour: options, failure policy, the pass manager's checks, export."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

import tilefuse
from tilefuse.compiler import pipeline
from tilefuse.compiler.capture import capture
from tilefuse.compiler.options import Options
from tilefuse.compiler.presets import load_model
from tilefuse.passes.base import PassContext, PassResult
from tilefuse.passes.manager import PassError, PassManager, check_graph


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner": "tvm"}, "inner"),
        ({"autotune": "always"}, "autotune"),
        ({"fusions": ["flash"]}, "fusions"),
        ({"strict": "yes"}, "strict"),
        ({"colour": 1}, "unknown tilefuse option"),
    ],
)
def test_options_reject_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Options.from_any(None, **kwargs)


def test_options_from_dict_and_string_fusions() -> None:
    opts = Options.from_any({"inner": "eager", "fusions": "attention, rope"})
    assert opts.inner == "eager" and opts.fusions == frozenset({"attention", "rope"})


class _Boom:
    name = "boom"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise RuntimeError("kaboom")


def test_failure_falls_back_with_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(pipeline, "default_passes", lambda: [_Boom()])
    model, inputs = load_model("demo")
    backend = tilefuse.TilefuseBackend(Options(inner="eager"))
    with caplog.at_level(logging.WARNING, logger="tilefuse"), torch.no_grad():
        out = torch.compile(model, backend=backend)(*inputs)
    torch.testing.assert_close(out, model(*inputs))
    assert backend.report.counters["fallback"] >= 1
    assert "pass boom failed after []" in backend.report.fallbacks[0]
    assert any("falling back" in r.message for r in caplog.records)


def test_strict_reraises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "default_passes", lambda: [_Boom()])
    model, inputs = load_model("demo")
    compiled = tilefuse.compile(model, strict=True, inner="eager")
    with pytest.raises(Exception, match="kaboom"), torch.no_grad():
        compiled(*inputs)


def test_pass_manager_names_failing_pass() -> None:
    gm = capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    ok = pipeline.default_passes()[0]
    with pytest.raises(PassError, match=r"pass boom failed after \['canonicalize'\]"):
        PassManager([ok, _Boom()])(gm, PassContext())


def test_every_pass_leaves_graph_valid() -> None:
    model, inputs = load_model("demo")
    gm = capture(model, inputs)
    outputs_before = [tuple(v.shape) for v in _output_vals(gm)]
    ctx = PassContext()
    for graph_pass in pipeline.default_passes():
        gm = PassManager([graph_pass])(gm, ctx).graph_module
        check_graph(gm)
        assert [tuple(v.shape) for v in _output_vals(gm)] == outputs_before, graph_pass.name
    with torch.no_grad():
        torch.testing.assert_close(pytree.tree_leaves(gm(*inputs))[0], model(*inputs), atol=2e-5, rtol=1e-4)


def _output_vals(gm: fx.GraphModule) -> list[torch.Tensor]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return [a.meta["val"] for a in pytree.tree_leaves(output.args[0]) if isinstance(a, fx.Node)]


def test_disabled_fusions_leave_sites() -> None:
    model, inputs = load_model("demo")
    report = tilefuse.explain(model, inputs, fusions=["rmsnorm"], strict=True)
    assert report.summary().get("attention") is None
    assert report.summary()["rmsnorm"]["fused"] >= 1


def test_export_rewrites_and_runs() -> None:
    model, inputs = load_model("demo")
    program, report = tilefuse.export(model, inputs, strict=True)
    assert report.summary()["attention"]["fused"] == 2
    targets = {str(n.target) for n in program.graph_module.graph.nodes}
    assert "tilefuse.attention.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*inputs), model(*inputs), atol=2e-5, rtol=1e-4)


def test_explain_validates_arguments() -> None:
    with pytest.raises(TypeError, match="example_inputs"):
        tilefuse.explain(torch.nn.Linear(2, 2), torch.randn(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        tilefuse.explain(42, (torch.randn(2),))


def test_backend_name_resolves_without_importing_tilefuse() -> None:
    """The torch_dynamo_backends entry point makes backend="tilefuse" work in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda x: torch.softmax(x @ x.mT, -1) @ x, backend='tilefuse', options={'inner': 'eager'})\n"
        "x = torch.randn(2, 3, 5, 4)\n"
        "torch.testing.assert_close(f(x), torch.softmax(x @ x.mT, -1) @ x)\n"
        "print('tilefuse' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("True")  # loaded through the entry point, not by the test


def test_dynamo_restart_signals_are_not_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo's restart signals (AOTAutograd raising TensorifyScalarRestartAnalysis to have float scalars
    specialized) must reach Dynamo, which re-traces and calls the backend again. Seen compiling several HF models
    in one process: a swallowed restart left a graph unfused for no reason."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    from tilefuse.compiler import backend as backend_module

    real_capture = backend_module.dynamo_graph_to_aten
    calls = []

    def capture_restarting_once(gm: fx.GraphModule, example_inputs: Any) -> fx.GraphModule:
        calls.append(gm)
        if len(calls) == 1:
            raise TensorifyScalarRestartAnalysis
        return real_capture(gm, example_inputs)

    monkeypatch.setattr(backend_module, "dynamo_graph_to_aten", capture_restarting_once)
    model, inputs = load_model("demo")
    backend = tilefuse.TilefuseBackend(Options(inner="eager"))
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*inputs)
    torch.testing.assert_close(out, model(*inputs))
    assert len(calls) >= 2  # Dynamo re-traced and called the backend again
    assert backend.report.counters["fallback"] == 0 and not backend.report.fallbacks
    assert any(s.kind == "attention" and s.status == "fused" for s in backend.report.sites)


@pytest.mark.parametrize("failure", ["restart", "error"])
def test_sites_are_reported_only_for_the_graph_that_is_compiled(monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """A restart raised by the inner compile (AOTAutograd asking Dynamo to re-trace, seen with HF Phi/GPT-J/ViT)
    used to leave the first attempt's sites in the report, so every site counted twice; an inner-compile error that
    falls back to the unfused graph must not report its sites as fused."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    from tilefuse.compiler import backend as backend_module

    real_inner = backend_module.inner_compile
    calls = []

    def inner_failing_once(gm: fx.GraphModule, example_inputs: Any, options: Options) -> Any:
        calls.append(gm)
        if len(calls) == 1:
            raise TensorifyScalarRestartAnalysis if failure == "restart" else RuntimeError("inner compiler broke")
        return real_inner(gm, example_inputs, options)

    monkeypatch.setattr(backend_module, "inner_compile", inner_failing_once)
    model, inputs = load_model("demo")
    backend = tilefuse.TilefuseBackend(Options(inner="eager"))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(*inputs), model(*inputs))
    report = backend.report
    if failure == "restart":
        assert report.graphs == 1 and report.summary()["attention"] == {"fused": 2, "declined": 0}
    else:  # the unfused graph was compiled: nothing fused to report, and the fallback says why
        assert report.graphs == 0 and not report.sites and "inner compiler broke" in report.fallbacks[0]


class _SharedForward(torch.nn.Module):
    """Every instance runs the same `forward` code, as every HF preset runs through one wrapper."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.inner(q)


class _Attend(torch.nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return (q @ q.transpose(-2, -1) * 0.25).softmax(-1) @ q


def test_explain_many_models_through_shared_code_past_dynamos_recompile_limit() -> None:
    """Each model adds a Dynamo cache entry for the shared forward; the default limit (8) would make the 9th and
    later run eagerly with an empty report."""
    q = torch.randn(1, 2, 8, 4)
    models = [
        _SharedForward(type(f"Attend{i}", (_Attend,), {})()) for i in range(torch._dynamo.config.recompile_limit + 3)
    ]
    for model in models:
        report = tilefuse.explain(model, (q,))
        assert report.summary()["attention"] == {"fused": 1, "declined": 0}, report.fallbacks


def test_explain_says_when_no_graph_reached_tilefuse(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tilefuse"):
        report = tilefuse.explain(lambda x: x, (torch.ones(2),))
    assert report.graphs == 0 and "no graph reached tilefuse" in report.fallbacks[0]
    assert "no graph reached tilefuse" in caplog.text
