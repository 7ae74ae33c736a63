"""Graphs that call a custom autograd.Function with grad enabled: the capture cuts them around each call, retraces
the stretches in between and joins them back, so the Function keeps its own backward (AOTAutograd differentiates
Dynamo's call) while attention on either side of it, or spread across it, still fuses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

import tilefuse
from tilefuse.compiler import capture as capture_module
from tilefuse.compiler.options import Options

B, H, N, D = 2, 2, 12, 8


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


class StraightThroughRound(torch.autograd.Function):
    """Rounds in the forward, passes the gradient through unchanged: autograd of round() would give zero, so a
    lost backward shows as zero gradients upstream."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class ScaledWithAux(torch.autograd.Function):
    """Two outputs, one of them non-differentiable, and a saved tensor."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(w)
        aux = (x > 0).sum(-1)
        ctx.mark_non_differentiable(aux)
        return x * w, aux

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _aux_grad: Tensor | None) -> tuple[Tensor, Tensor]:
        (w,) = ctx.saved_tensors
        return grad * w * 2, torch.zeros_like(w)  # deliberately not the true derivative: it must be the one used


def attend(x: Tensor, qkv: nn.Linear, causal_n: int | None = None) -> Tensor:
    b, n, _ = x.shape
    q, k, v = qkv(x).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) * D**-0.5
    if causal_n is not None:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, H * D)


class TwoBlocks(nn.Module):
    """attention → custom Function → attention, the mask of the second built before the call."""

    def __init__(self, function: str = "round") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv1, self.qkv2 = nn.Linear(H * D, 3 * H * D), nn.Linear(H * D, 3 * H * D)
        self.w = nn.Parameter(torch.rand(H * D) + 0.5)
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        keep = torch.ones(n, n, dtype=torch.bool).tril()  # used only after the Function call
        h = attend(x, self.qkv1)
        if self.function == "round":
            h = StraightThroughRound.apply(h)
        else:
            h, aux = ScaledWithAux.apply(h, self.w)
            h = h + aux[..., None].to(h.dtype) * 1e-3
        b = x.shape[0]
        q, k, v = self.qkv2(h).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1) * D**-0.5).masked_fill(~keep, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, H * D)


class FunctionOnScores(nn.Module):
    """The Function sits between the attention's matmuls: that chain cannot be fused."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(H * D, 3 * H * D)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
        scores = StraightThroughRound.apply(q @ k.transpose(-2, -1) * D**-0.5)
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, H * D)


def _run(model: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = fn(x)
    out.square().mean().backward()
    assert x.grad is not None
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), {"x": x.grad.clone(), **grads}


def _compare(model: nn.Module, x: Tensor, **compile_kwargs: Any) -> tilefuse.FusionReport:
    expected_out, expected_grads = _run(model, model, x)
    backend = tilefuse.TilefuseBackend(Options(strict=True, inner="eager"))
    compiled = torch.compile(model, backend=backend, fullgraph=True, **compile_kwargs)
    out, grads = _run(model, compiled, x)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    assert not backend.report.fallbacks and backend.report.counters["graph_declined"] == 0
    return backend.report


@pytest.mark.parametrize("function", ["round", "aux"])
def test_attention_on_both_sides_fuses_and_the_function_keeps_its_backward(function: str) -> None:
    model = TwoBlocks(function)
    x = torch.randn(B, N, H * D, generator=torch.Generator().manual_seed(1))
    report = _compare(model, x)
    sites = report.by_kind("attention")
    assert [s.status for s in sites] == ["fused", "fused"]
    assert [s.spec.causal for s in sites] == [False, True]  # the mask built before the call is still proven causal
    _, grads = _run(model, model, x)
    assert grads["qkv1.weight"].abs().sum() > 0  # the gradient crossed the Function through its own backward


def test_function_between_the_matmuls_leaves_that_attention_unfused() -> None:
    x = torch.randn(B, N, H * D, generator=torch.Generator().manual_seed(2))
    report = _compare(FunctionOnScores(), x)
    assert not [s for s in report.by_kind("attention") if s.status == "fused"]


def test_dynamic_sequence_lengths() -> None:
    model = TwoBlocks()
    for n in (N, N + 5):
        x = torch.randn(B, n, H * D, generator=torch.Generator().manual_seed(n))
        report = _compare(model, x, dynamic=True)
        assert {s.status for s in report.by_kind("attention")} == {"fused"}


def test_split_keeps_each_call_whole_and_the_rest_in_order() -> None:
    captured: list[fx.GraphModule] = []

    def keep_graph(gm: fx.GraphModule, example_inputs: Any) -> Any:
        captured.append(gm)
        return gm.forward

    model = TwoBlocks("aux")
    x = torch.randn(B, N, H * D, requires_grad=True)
    torch.compile(model, backend=keep_graph, fullgraph=True)(x)
    (gm,) = captured
    split = capture_module._split_at_autograd_functions(gm)
    assert split is not None
    module, segments = split
    parts = [n.target for n in module.graph.nodes if n.op == "call_module"]
    assert len(parts) == 3 and [p in segments for p in parts] == [True, False, True]
    function_part = module.get_submodule(parts[1])
    calls = [n for n in function_part.graph.nodes if n.op == "call_function"]
    assert capture_module._is_autograd_function(calls[0])
    assert len(calls) >= 3 and all(n.target.__name__ == "getitem" for n in calls[1:])  # both outputs read there
    assert capture_module._split_at_autograd_functions(_traced_without_function()) is None


def _traced_without_function() -> fx.GraphModule:
    captured: list[fx.GraphModule] = []

    def keep_graph(gm: fx.GraphModule, example_inputs: Any) -> Any:
        captured.append(gm)
        return gm.forward

    qkv = nn.Linear(H * D, 3 * H * D)
    torch.compile(lambda x: attend(x, qkv), backend=keep_graph, fullgraph=True)(torch.randn(B, N, H * D))
    return captured[0]
