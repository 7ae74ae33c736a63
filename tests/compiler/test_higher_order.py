"""Fusion inside the bodies of higher-order ops: activation checkpointing (torch.utils.checkpoint, plain, selective
and reentrant; HF gradient checkpointing), `wrap` and `nested_compile_region` (invoke_subgraph). The fused ops live
inside the body, so a checkpoint body still recomputes in the backward (its fused forward op runs twice), each body
site is reported once, and losses and gradients match eager."""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch._higher_order_ops.wrap import wrap
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import tilefuse
from tilefuse.compiler.backend import TilefuseBackend
from tilefuse.compiler.options import Options
from tilefuse.passes.advice import forget_advice

H, D, N, LAYERS = 2, 8, 12, 2
ATTENTION, ATTENTION_BACKWARD = "tilefuse::attention", "tilefuse::attention_backward"


@pytest.fixture(autouse=True)
def _fresh() -> None:
    torch._dynamo.reset()
    forget_advice()


def attend(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Causal self-attention with a hand-written softmax(QKᵀ)V (the recognizer's input)."""
    b, n, _ = x.shape
    q, k, v = F.linear(x, weight, bias).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1) * D**-0.5).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf)
    return x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, H * D)


def save_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing: keep the fused attention's outputs, recompute the rest."""
    return (
        CheckpointPolicy.MUST_SAVE if op is torch.ops.tilefuse.attention.default else CheckpointPolicy.PREFER_RECOMPUTE
    )


REGION = torch.compiler.nested_compile_region(attend)
WRAPPERS: dict[str, Callable[..., Tensor]] = {
    "checkpoint": functools.partial(checkpoint, attend, use_reentrant=False),
    "reentrant": functools.partial(checkpoint, attend, use_reentrant=True),
    "selective": functools.partial(
        checkpoint,
        attend,
        use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, save_attention),
    ),
    "wrap": functools.partial(wrap, attend),
    "region": REGION,
}


class Blocks(nn.Module):
    """LAYERS attention blocks, each called through `wrapper`."""

    def __init__(self, wrapper: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(H * D, 3 * H * D) for _ in range(LAYERS))
        self.wrapper = WRAPPERS[wrapper]

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = self.wrapper(x, layer.weight, layer.bias)
        return x


def _op_calls(step: Callable[[], Any]) -> Counter[str]:
    """How often each tilefuse op ran during `step` (profiler events of the CPU ops)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return Counter(e.name for e in prof.events() if e.name.startswith("tilefuse::"))


def _train_step(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach()


# (sites reported, attention forwards per training step, attention backwards per step)
EXPECTED = {
    "checkpoint": (LAYERS, 2 * LAYERS, LAYERS),  # each body's forward runs again in the backward
    "reentrant": (LAYERS, 2 * LAYERS, LAYERS),  # Dynamo traces it as the same higher-order op
    "selective": (LAYERS, LAYERS, LAYERS),  # the policy saves the attention's outputs: no recompute of it
    "wrap": (LAYERS, LAYERS, LAYERS),
    "region": (1, LAYERS, LAYERS),  # one body shared by both calls: one site
}


def _train_like_eager(eager: nn.Module, ours: nn.Module) -> tuple[TilefuseBackend, Any, Tensor]:
    """One training step of `ours` compiled with tilefuse against `eager`: losses and every gradient match."""
    backend = TilefuseBackend(Options(strict=True, inner="eager"))
    compiled = torch.compile(ours, backend=backend)
    # An input that requires grad, as hidden states do (Dynamo inlines a nested_compile_region called without).
    x = torch.randn(2, N, H * D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.testing.assert_close(_train_step(compiled, x), _train_step(eager, x))
    for mine, reference in zip(ours.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, reference.grad)
    return backend, compiled, x


@pytest.mark.parametrize("wrapper", list(EXPECTED))
def test_bodies_fuse_keep_their_semantics_and_match_eager(wrapper: str) -> None:
    eager, ours = Blocks(wrapper), Blocks(wrapper)
    backend, compiled, x = _train_like_eager(eager, ours)
    sites, forwards, backwards = EXPECTED[wrapper]
    fused = backend.report.by_kind("attention")
    assert [s.status for s in fused] == ["fused"] * sites
    assert all(s.spec is not None and s.spec.causal and s.spec.mask == "none" for s in fused)
    calls = _op_calls(lambda: _train_step(compiled, x))
    assert (calls[ATTENTION], calls[ATTENTION_BACKWARD]) == (forwards, backwards)


def _hf_llama_checkpointed() -> tuple[nn.Module, tuple[Any, ...]]:
    pytest.importorskip("transformers")
    from tilefuse.compiler.presets import load_model

    model, inputs = load_model("hf:llama", seq=16)
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), inputs


def _hf_train(model: nn.Module, inputs: tuple[Any, ...], steps: int) -> tuple[list[Tensor], list[Tensor]]:
    """`steps` SGD steps; the losses and the gradients of the last step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        losses.append(_train_step(lambda ids: model(ids), inputs[0]))
        optimizer.step()
    return losses, [p.grad.clone() for p in model.parameters() if p.grad is not None]


# transformers' `kernels` wrapper mutates a global inside every decoder layer; Dynamo graph-breaks a checkpoint around
# such a side effect unless told it need not replay it in the recompute (what the advice below says).
NO_REPLAY = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}


@pytest.mark.hf
@pytest.mark.slow
def test_hf_llama_gradient_checkpointing_fuses_every_site_and_recomputes() -> None:
    eager, inputs = _hf_llama_checkpointed()
    ours, _ = _hf_llama_checkpointed()
    with torch._dynamo.config.patch(NO_REPLAY):
        compiled = tilefuse.compile(ours, strict=True, inner="eager")
        eager_losses, eager_grads = _hf_train(eager, inputs, steps=2)
        losses, grads = _hf_train(compiled, inputs, steps=2)
        calls = _op_calls(lambda: _train_step(lambda ids: compiled(ids), inputs[0]))
    torch.testing.assert_close(losses, eager_losses)
    for mine, reference in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(mine, reference)
    report = compiled.tilefuse_report
    assert {kind: counts["fused"] for kind, counts in report.summary().items()} == {
        "rmsnorm": 5,
        "rope": 4,
        "attention": 2,
    }
    assert all(site.status == "fused" for site in report.sites)
    for site in report.by_kind("attention"):  # HF builds the mask outside the layers: proven causal inside them
        assert site.spec is not None and site.spec.causal and site.spec.mask == "none", site.spec
    inside = [s.node for s in report.sites if "." in s.node]
    assert len(inside) == 10  # all but the final norm live in the two checkpointed layers
    layers = 2
    assert (calls[ATTENTION], calls[ATTENTION_BACKWARD]) == (2 * layers, layers)


def attend_masked(x: Tensor, weight: Tensor, bias: Tensor, keep: Tensor) -> Tensor:
    b, n, _ = x.shape
    q, k, v = F.linear(x, weight, bias).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1) * D**-0.5).masked_fill(~keep, -torch.inf)
    return x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, H * D)


class OuterMask(Blocks):
    """The causal mask built once outside the checkpointed blocks and passed into each, as HF decoders do."""

    def __init__(self) -> None:
        super().__init__("checkpoint")

    def forward(self, x: Tensor) -> Tensor:
        positions = torch.arange(x.shape[1])
        keep = positions[:, None] >= positions[None, :]
        for layer in self.layers:
            x = checkpoint(attend_masked, x, layer.weight, layer.bias, keep, use_reentrant=False)
        return x


def test_a_mask_built_outside_the_checkpoint_is_proven_causal_inside() -> None:
    eager, ours = OuterMask(), OuterMask()
    backend, _, _ = _train_like_eager(eager, ours)
    specs = [s.spec for s in backend.report.by_kind("attention")]
    assert len(specs) == LAYERS
    assert all(spec is not None and spec.causal and spec.mask == "none" for spec in specs)


STATS: dict[str, int] = {}


def attend_and_count(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    STATS["calls"] = STATS.get("calls", 0) + 1  # a Python side effect eager checkpointing replays in the recompute
    return attend(x, weight, bias)


class CountingBlocks(Blocks):
    def __init__(self) -> None:
        super().__init__("checkpoint")

    def forward(self, x: Tensor) -> Tensor:
        x = x * 2  # a graph before the regions, for the backend to see Dynamo's break (no loop: it resumes after)
        first, second = self.layers
        x = checkpoint(attend_and_count, x, first.weight, first.bias, use_reentrant=False)
        return checkpoint(attend_and_count, x, second.weight, second.bias, use_reentrant=False)


def test_a_checkpoint_dynamo_cannot_trace_is_told_once_with_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    model = CountingBlocks()
    x = torch.randn(2, N, H * D, requires_grad=True)
    compiled = tilefuse.compile(model, strict=True, inner="eager")
    with caplog.at_level(logging.WARNING, logger="tilefuse"):
        _train_step(compiled, x)
    flag = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    assert len([r for r in caplog.records if flag in r.getMessage()]) == 1  # two regions broke: told once
    assert [a.key for a in compiled.tilefuse_report.advice] == ["checkpoint_side_effect"]
    assert compiled.tilefuse_report.by_kind("attention") == []  # the regions ran eagerly
    torch._dynamo.reset()
    with torch._dynamo.config.patch({flag: True}):  # the fix named
        fixed = tilefuse.compile(model, strict=True, inner="eager")
        _train_step(fixed, x)
    assert [s.status for s in fixed.tilefuse_report.by_kind("attention")] == ["fused"] * LAYERS


def test_compile_gives_its_report_for_functions_and_modules() -> None:
    def function(x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6)

    module = Blocks("checkpoint")
    compiled_function = tilefuse.compile(function, strict=True, inner="eager")
    compiled_module = tilefuse.compile(module, strict=True, inner="eager")
    compiled_function(torch.randn(2, 8))
    compiled_module(torch.randn(2, N, H * D))
    assert compiled_function.tilefuse_report.summary() == {"rmsnorm": {"fused": 1, "declined": 0}}
    assert compiled_module.tilefuse_report.summary() == {"attention": {"fused": LAYERS, "declined": 0}}
    assert not hasattr(module, "tilefuse_report")  # the user's module is left as it was
