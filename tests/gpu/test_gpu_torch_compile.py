"""torch.compile(model, backend="tilefuse") on a tiny Llama (config only, random weights) in bf16 on the GPU:
every attention and norm site fused (RoPE inside attention), the compiled forward and backward launch tilefuse's
kernels with no fallback, and logits and every parameter gradient pass the protocol against the fp64 eager model
(whose norms, RoPE tables and softmax Hugging Face still takes through fp32: far below bf16's rounding). Default
options (Inductor for the rest of the graph, tile configs from the tuning db or the cost model) but a fresh db."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _kernel_watch import KernelWatch
from _numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_finite, assert_no_worse_than_eager
from _profile import DEVICE, PROFILE
from test_gpu_attention import BACKWARD, FORWARD
from torch import Tensor, nn

import tilefuse
from tilefuse.compiler.presets import HFOutput
from tilefuse.passes.base import Site

VOCAB = 128


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    size = PROFILE.model
    config = transformers.LlamaConfig(
        hidden_size=size["hidden"], intermediate_size=2 * size["hidden"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"], vocab_size=VOCAB,
        max_position_embeddings=max(128, size["seq"]),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return HFOutput(model.eval(), ("input_ids",), "logits", {"use_cache": False}).eval()


def _forward_backward(
    model: nn.Module, ids: Tensor, grad_out: Tensor | None, call: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """(logits, d(Σ logits·grad_out)/d(parameter) by name, grad_out) of `call` (default: the model); grad_out
    defaults to seeded noise in the logits' dtype."""
    logits = (model if call is None else call)(ids)
    if grad_out is None:
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        grad_out = torch.randn(logits.shape, generator=gen, device=DEVICE).to(logits.dtype)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(logits, params, grad_out.to(logits.dtype))
    return logits.detach(), dict(zip(names, grads, strict=True)), grad_out


def _assert_every_site_fused(sites: list[Site]) -> None:
    declined = [f"{s.kind} {s.node}: {s.reason}" for s in sites if s.status == "declined"]
    assert not declined, declined
    attention = [s for s in sites if s.kind == "attention"]
    assert len(attention) == PROFILE.model["layers"], [s.kind for s in sites]
    assert all(s.spec is not None and s.spec.rope is not None for s in attention), "RoPE not inside attention"
    assert sum(s.kind == "rmsnorm" for s in sites) >= 2 * PROFILE.model["layers"], [s.kind for s in sites]


def test_compiled_tiny_llama_runs_the_kernels_and_matches_golden(tmp_path: Path, kernels: KernelWatch) -> None:
    model = _tiny_llama()
    eager = copy.deepcopy(model).to(DEVICE, torch.bfloat16)
    golden = copy.deepcopy(model).to(DEVICE, torch.float64)
    ours = copy.deepcopy(eager)
    options = {"tuning_db": str(tmp_path / "tuning.sqlite")}  # a fresh db: configs come from the cost model
    compiled = torch.compile(ours, backend="tilefuse", options=options)
    report = tilefuse.GLOBAL_REPORT
    first_site, fallbacks = len(report.sites), list(report.fallbacks)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, VOCAB, (PROFILE.batch, PROFILE.model["seq"]), generator=gen, device=DEVICE)

    ours_logits, ours_grads, grad_out = _forward_backward(ours, ids, None, compiled)
    eager_logits, eager_grads, _ = _forward_backward(eager, ids, grad_out)
    golden_logits, golden_grads, _ = _forward_backward(golden, ids, grad_out.double())

    _assert_every_site_fused(report.sites[first_site:])
    assert report.fallbacks == fallbacks, report.fallbacks[len(fallbacks) :]
    kernels.assert_ran(FORWARD, *BACKWARD, "norm_forward_kernel", "norm_backward_kernel")
    assert ours_grads.keys() == eager_grads.keys()
    assert_finite(["logits", *ours_grads], [ours_logits, *ours_grads.values()])
    assert_no_worse_than_eager("logits", ours_logits, eager_logits, golden_logits, FORWARD_FACTOR)
    for name, grad in ours_grads.items():
        assert_no_worse_than_eager(f"d {name}", grad, eager_grads[name], golden_grads[name], GRADIENT_FACTOR)
