"""Real Hugging Face models through torch.compile(backend=tilefuse): every site fused, forward and backward exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tilefuse
from tilefuse.compiler.presets import HF_PRESETS, load_model

pytest.importorskip("transformers")

# GPT-J applies RoPE in [B, N, H, D] layout before the head permute; it is absorbed through the permute.
ROTARY = {"hf:llama", "hf:mistral", "hf:qwen2", "hf:gemma", "hf:gemma2", "hf:phi", "hf:gptj"}
NO_SDPA = {"hf:gptj", "hf:gemma2", "hf:bloom"}  # transformers 5.23 has no SDPA path for these
ENCODERS = {"hf:bert", "hf:vit"}  # bert's inputs carry padding
DECODERS = sorted(name for name in HF_PRESETS if name != "hf:vit")
CASES = [
    f"{name}@{impl}" for name in DECODERS for impl in ("eager", "sdpa") if not (impl == "sdpa" and name in NO_SDPA)
]
CASES.append("hf:vit@eager")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _site_counts(report: tilefuse.FusionReport) -> dict[str, dict[str, int]]:
    return report.summary()


def _declines(report: tilefuse.FusionReport) -> list[str]:
    return [f"{s.kind} {s.node}: {s.reason}" for s in report.sites if s.status == "declined"]


@pytest.mark.parametrize("case", CASES)
def test_every_site_fused(case: str) -> None:
    model, inputs = load_model(case)
    report = tilefuse.explain(model, inputs, strict=True)
    summary = _site_counts(report)
    assert not _declines(report), _declines(report)
    assert summary.get("attention", {}).get("fused", 0) >= 2, summary
    norm_sites = summary.get("rmsnorm", {}).get("fused", 0) + summary.get("layernorm", {}).get("fused", 0)
    assert norm_sites >= 2, summary
    name = case.split("@")[0]
    attention_specs = [s.spec for s in report.by_kind("attention")]
    if name in ROTARY:
        assert all(spec is not None and spec.rope is not None for spec in attention_specs), attention_specs
    if name not in ENCODERS:  # no padding in the inputs: the causal mask is proven, no data mask is left
        assert all(spec.causal and spec.mask == "none" for spec in attention_specs), attention_specs
    json_ready = report.to_dict()
    assert json_ready["summary"] == summary


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model: torch.nn.Module, fn: Any, inputs: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = fn(*inputs)
    (out.float().square().mean()).backward()
    return out.detach(), _grads(model)


@pytest.mark.parametrize(
    "case",
    [
        "hf:llama@eager",
        "hf:llama@sdpa",
        "hf:gpt2@eager",
        "hf:bert@eager",
        "hf:bert@sdpa",
        "hf:gemma2@eager",
        "hf:mistral@sdpa",
        "hf:phi@eager",
        "hf:gptj@eager",
    ],
)
def test_forward_backward_match_eager(case: str) -> None:
    model, inputs = load_model(case)
    ref_out, ref_grads = _run(model, model, inputs)
    compiled = tilefuse.compile(model, strict=True, inner="eager", fullgraph=True)
    out, grads = _run(model, compiled, inputs)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=5e-5, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", ["hf:gpt2@eager", "hf:bert@sdpa"])
def test_training_mode_attention_dropout_fuses(case: str) -> None:
    """nn.Dropout on the probabilities (GPT-2 eager) and SDPA's dropout_p (BERT) fuse in train mode; forward and
    backward are finite and a manual_seed reproduces them (eager's own dropout mask cannot be reproduced)."""
    model, inputs = load_model(case)
    model.train()
    report = tilefuse.explain(model, inputs, strict=True)
    assert not _declines(report), _declines(report)
    specs = [s.spec for s in report.by_kind("attention")]
    assert len(specs) >= 2 and all(spec is not None and spec.dropout_p == 0.1 for spec in specs), specs
    compiled = tilefuse.compile(model, strict=True, inner="eager", fullgraph=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(_run(model, compiled, inputs))
    (out, grads), (out_again, grads_again) = runs
    assert torch.isfinite(out).all() and torch.equal(out, out_again)
    assert grads.keys() == grads_again.keys() and grads
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and torch.equal(grad, grads_again[name]), name


def test_two_sequence_lengths_bounded_recompiles() -> None:
    model, inputs = load_model("hf:llama@eager", seq=16)
    _, longer = load_model("hf:llama@eager", seq=24)
    backend = tilefuse.TilefuseBackend(tilefuse.Options(strict=True, inner="eager"))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for example in (inputs, longer, inputs):
            torch.testing.assert_close(compiled(*example), model(*example), atol=2e-5, rtol=1e-4)
    assert backend.report.graphs <= 2
    assert backend.report.summary()["attention"]["declined"] == 0


def test_registered_backend_name_with_options() -> None:
    model, inputs = load_model("demo")
    compiled = torch.compile(model, backend="tilefuse", options={"inner": "eager", "strict": True})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=2e-5, rtol=1e-4)


def test_inductor_inner_compiler_on_demo() -> None:
    model, inputs = load_model("demo")
    compiled = tilefuse.compile(model, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=2e-5, rtol=1e-4)


def test_output_attentions_declines_and_stays_correct() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()

    class WithProbs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(input_ids=ids, output_attentions=True, use_cache=False)
            return (out.logits, *out.attentions)

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    wrapped = WithProbs()
    report = tilefuse.explain(wrapped, (ids,), strict=True)
    attention = report.by_kind("attention")
    assert attention and all(s.status == "declined" for s in attention)
    assert all("outside" in (s.reason or "") for s in attention)
    compiled = tilefuse.compile(wrapped, strict=True, inner="eager")
    with torch.no_grad():
        for got, want in zip(compiled(ids), wrapped(ids), strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
