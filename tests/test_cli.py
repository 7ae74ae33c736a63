"""The `tilefuse` CLI: model presets, the argument parser, `explain --json` and the demo's exit code."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tilefuse.compiler import cli, commands, render
from tilefuse.compiler.presets import HF_PRESETS, PRESET_NAMES, load_model
from tilefuse.passes.base import Site

SDPA_PRESETS = ("hf:llama", "hf:mistral", "hf:qwen2", "hf:gemma", "hf:phi", "hf:gpt2", "hf:opt", "hf:bert", "hf:vit")
EAGER_ONLY_PRESETS = ("hf:gemma2", "hf:gptj", "hf:bloom")


def _needs(module: str, why: str) -> None:
    pytest.importorskip(module, reason=f"{module} is not importable yet: {why}")


def _needs_explain() -> None:
    import tilefuse

    if not hasattr(tilefuse, "explain"):
        pytest.skip("tilefuse.explain is not in this checkout yet: the CLI renders its FusionReport")


# ------------------------------------------------------------------------------------------------ presets


def _run_eager(name: str) -> torch.Tensor:
    model, inputs = load_model(name, batch=2, seq=8)
    assert not model.training
    with torch.no_grad():
        out = model(*inputs)
    assert isinstance(out, torch.Tensor)
    assert torch.isfinite(out).all()
    return out


def test_demo_preset_runs() -> None:
    assert _run_eager("demo").shape == (2, 8, 128)


def test_demo_preset_is_deterministic() -> None:
    assert torch.equal(_run_eager("demo"), _run_eager("demo"))


@pytest.mark.hf
@pytest.mark.parametrize("name", list(HF_PRESETS))
def test_hf_preset_runs_eager(name: str) -> None:
    pytest.importorskip("transformers", reason="the hf presets need the `hf` extra")
    out = _run_eager(f"{name}@eager")
    assert out.shape[0] == 2
    assert torch.equal(out, _run_eager(name)), "eager must be the default attention implementation"


@pytest.mark.hf
@pytest.mark.parametrize("name", SDPA_PRESETS)
def test_hf_preset_runs_sdpa_like_eager(name: str) -> None:
    pytest.importorskip("transformers", reason="the hf presets need the `hf` extra")
    torch.testing.assert_close(_run_eager(f"{name}@sdpa"), _run_eager(f"{name}@eager"), atol=1e-5, rtol=1e-5)


@pytest.mark.hf
@pytest.mark.parametrize("name", EAGER_ONLY_PRESETS)
def test_hf_preset_without_sdpa_says_so(name: str) -> None:
    """These models gained sdpa attention in some transformers releases (Gemma2 has it in 5.17, not in 5.23):
    where the installed release has it, @sdpa runs like @eager; where not, loading it names @eager."""
    transformers = pytest.importorskip("transformers", reason="the hf presets need the `hf` extra")
    if getattr(getattr(transformers, HF_PRESETS[name].model_class), "_supports_sdpa", False):
        torch.testing.assert_close(_run_eager(f"{name}@sdpa"), _run_eager(f"{name}@eager"), atol=1e-5, rtol=1e-5)
        return
    with pytest.raises(ValueError, match="@eager"):
        load_model(f"{name}@sdpa")


@pytest.mark.hf
def test_bert_inputs_carry_padding() -> None:
    pytest.importorskip("transformers", reason="the hf presets need the `hf` extra")
    _, (input_ids, attention_mask) = load_model("hf:bert", batch=2, seq=16)
    assert input_ids.shape == attention_mask.shape == (2, 16)
    assert attention_mask[0].all() and not attention_mask[1].all()


@pytest.mark.parametrize("name", ["nope", "hf:nope", "llama", "demo@sdpa", ":factory", "module:"])
def test_unknown_model_lists_presets(name: str) -> None:
    with pytest.raises(ValueError, match="hf:llama") as info:
        load_model(name)
    assert all(preset in str(info.value) for preset in PRESET_NAMES)


def test_unknown_attention_implementation() -> None:
    with pytest.raises(ValueError, match="flash"):
        load_model("hf:llama@flash")


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"seq": -1}, {"seq": 1.5}])
def test_bad_sizes(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"batch|seq"):
        load_model("demo", **kwargs)


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    source = """
        import torch

        def make(batch, seq):
            return torch.nn.Linear(seq, 3), [torch.ones(batch, seq)]

        def make_fixed():
            return torch.nn.Identity(), (torch.zeros(1),)

        def broken():
            return "not a model"
    """
    (tmp_path / "tilefuse_test_factories.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tilefuse_test_factories"


def test_factory_receives_sizes(factory_module: str) -> None:
    model, inputs = load_model(f"{factory_module}:make", batch=3, seq=5)
    assert isinstance(model, torch.nn.Linear) and isinstance(inputs, tuple)
    assert model(*inputs).shape == (3, 3)


def test_factory_without_size_parameters(factory_module: str) -> None:
    model, inputs = load_model(f"{factory_module}:make_fixed", batch=3)
    assert isinstance(model, torch.nn.Identity) and inputs[0].shape == (1,)


def test_factory_errors(factory_module: str) -> None:
    with pytest.raises(TypeError, match="factory must return"):
        load_model(f"{factory_module}:broken")
    with pytest.raises(ValueError, match="no attribute"):
        load_model(f"{factory_module}:missing")
    with pytest.raises(ImportError):
        load_model("tilefuse_no_such_module:make")


# ------------------------------------------------------------------------------------------------ parser


def test_parser_explain() -> None:
    args = cli.build_parser().parse_args(["explain", "hf:llama@sdpa", "--json", "--seq", "8"])
    assert (args.command, args.model, args.json) == ("explain", "hf:llama@sdpa", True)
    assert (args.seq, args.batch) == (8, 2)
    assert args.run is cli.run_explain


def test_parser_demo_and_log_level() -> None:
    args = cli.build_parser().parse_args(["--log-level", "DEBUG", "demo"])
    assert (args.command, args.json, args.log_level, args.run) == ("demo", False, "DEBUG", cli.run_demo)


@pytest.mark.parametrize("argv", [[], ["explain"], ["explain", "demo", "--seq", "0"], ["frobnicate"]])
def test_parser_rejects(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == cli.EXIT_USAGE
    assert "usage: tilefuse" in capsys.readouterr().err


def test_explain_unknown_model_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain", "nope"]) == cli.EXIT_USAGE
    assert "unknown model" in capsys.readouterr().err


def test_console_script_is_declared() -> None:
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [ep.value for ep in scripts if ep.name == "tilefuse"] == ["tilefuse.compiler.cli:main"]


def test_bench_comes_from_its_entry_point() -> None:
    """`tilefuse bench` is the benchmarks' command, found installed: the compiler does not import the benchmarks."""
    installed = importlib.metadata.entry_points(group=commands.ENTRY_POINT_GROUP)
    assert [ep.value for ep in installed if ep.name == "bench"] == ["tilefuse.benchmarks.run:COMMAND"]
    args = cli.build_parser().parse_args(["bench", "io", "--tiny"])
    assert (args.command, args.suites, args.tiny) == ("bench", ["io"], True)


def test_missing_entry_points_say_how_to_reinstall(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(commands.importlib.metadata, "entry_points", lambda **_: [])
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "io"])
    assert info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid choice: 'bench'" in err and "reinstall tilefuse" in err and "Traceback" not in err


def test_a_broken_entry_point_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = importlib.metadata.EntryPoint("bench", "tilefuse.benchmarks.no_such_module:COMMAND", "tilefuse.commands")
    monkeypatch.setattr(commands.importlib.metadata, "entry_points", lambda **_: [broken])
    assert cli.main(["bench", "io", "--tiny"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "tilefuse bench is unavailable" in err and "no_such_module" in err and "Traceback" not in err
    assert cli.main(["explain", "nope"]) == cli.EXIT_USAGE  # the other commands still run


def test_module_help_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tilefuse.compiler.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "explain" in done.stdout and "demo" in done.stdout


# ------------------------------------------------------------------------------------------------ rendering


ROPE = {"kind": "rope", "layout": "rotate_half", "rotary_dim": 16, "head_dim": 16}


def test_spec_summary_shows_what_is_special() -> None:
    spec = {
        "kind": "attention",
        "q_len": 16,
        "kv_len": 16,
        "head_dim": 16,
        "gqa_group": 2,
        "causal": True,
        "window": None,
        "softcap": None,
        "alibi": False,
        "mask": "none",
        "dropout_p": 0.0,
        "rope": ROPE,
    }
    line = render.spec_summary("attention", spec)
    assert "causal=True" in line and "gqa_group=2" in line and "rope=rotate_half/16" in line
    assert "alibi" not in line and "window" not in line and "dropout_p" not in line
    assert render.spec_summary("rmsnorm", None) == ""


def _site(kind: str, status: str = "fused", reason: str | None = None, **spec: Any) -> Site:
    spec_obj = SimpleNamespace(to_dict=lambda: {"kind": kind, **spec}) if status == "fused" else None
    return Site(kind, status, f"{kind}_0", spec=spec_obj, reason=reason)


def _report(*sites: Site) -> SimpleNamespace:
    return SimpleNamespace(sites=list(sites), summary=lambda: {"attention": {"fused": 1, "declined": 0}})


def test_demo_problems() -> None:
    good = _report(_site("attention", rope=ROPE, causal=True), _site("rmsnorm", eps=1e-6))
    assert cli.demo_problems(0.0, good) == []
    assert "max abs error" in cli.demo_problems(1.0, good)[0]
    assert cli.demo_problems(float("nan"), good)
    declined = _report(_site("attention", rope=ROPE), _site("rmsnorm", "declined", "mean taken in fp16"))
    assert cli.demo_problems(0.0, declined) == ["rmsnorm site rmsnorm_0 declined: mean taken in fp16"]
    no_rope = _report(_site("attention", rope=None), _site("rmsnorm"))
    assert cli.demo_problems(0.0, no_rope) == ["attention site attention_0 was fused without its RoPE"]
    assert cli.demo_problems(0.0, _report()) == ["no attention site was found", "no rmsnorm site was found"]


def test_sites_table_escapes_markup(capsys: pytest.CaptureFixture[str]) -> None:
    report = _report(_site("attention", "declined", "mask [b, 1, n, n] of dtype int8"))
    render.render_report(render.Console(width=200), report, title="t")
    out = capsys.readouterr().out
    assert "mask [b, 1, n, n] of dtype int8" in out and "attention: 1 fused, 0 declined" in out


# ------------------------------------------------------------------------------------------------ end to end


def _attention_sites(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [site for site in report["sites"] if site["kind"] == "attention"]


def test_explain_json_on_demo(capsys: pytest.CaptureFixture[str]) -> None:
    _needs_explain()
    assert cli.main(["explain", "demo", "--json", "--seq", "8"]) == cli.EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert {"sites", "counters"} <= set(report)
    attention = _attention_sites(report)
    assert len(attention) == 2
    for site in attention:
        assert site["status"] == "fused", site["reason"]
        spec = site["spec"]
        assert {"rope", "causal", "window", "softcap", "alibi", "gqa_group", "mask"} <= set(spec)
        assert spec["causal"] and spec["gqa_group"] == 2 and spec["rope"] is not None
    norms = [site for site in report["sites"] if site["kind"] == "rmsnorm"]
    assert len(norms) == 5 and all(site["status"] == "fused" for site in norms)


def test_explain_table_on_demo(capsys: pytest.CaptureFixture[str]) -> None:
    _needs_explain()
    assert cli.main(["explain", "demo", "--seq", "8"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "attention" in out and "rmsnorm" in out and "fused" in out


@pytest.mark.hf
def test_explain_json_on_bert(capsys: pytest.CaptureFixture[str]) -> None:
    _needs_explain()
    pytest.importorskip("transformers", reason="the hf presets need the `hf` extra")
    assert cli.main(["explain", "hf:bert", "--json", "--seq", "8"]) == cli.EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert len(_attention_sites(report)) == 2
    assert any(site["kind"] == "layernorm" for site in report["sites"])


def test_demo_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    _needs_explain()
    _needs("tilefuse.compiler.backend", "the demo compiles with backend='tilefuse'")
    code = cli.main(["demo", "--json"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_OK, err or json.loads(out)["problems"]
    result = json.loads(out)
    assert result["ok"] and result["max_abs_error"] <= cli.DEMO_ATOL
