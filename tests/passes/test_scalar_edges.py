"""Scalar edge values in the recognizers: a scale of 0, negative or tiny scales, negative or zero softcaps, eps of
0, division by zero, and scalars held in tensors (declined with advice naming the fix)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _attention_cases import Attend, Shape, qkv
from _helpers import assert_fused, fuse, reasons, run_pass, sites
from torch import Tensor, nn

from tilefuse.passes.advice import forget_advice
from tilefuse.passes.norms import NormPass
from tilefuse.specs import AttentionSpec, NormSpec

SHAPE = Shape(7, 9, 16)


@pytest.fixture(autouse=True)
def _fresh_advice() -> None:
    forget_advice()


def _inputs() -> tuple[Tensor, Tensor, Tensor]:
    return qkv(SHAPE, torch.Generator().manual_seed(0))


def _qk(q: Tensor, k: Tensor) -> Tensor:
    return q @ k.transpose(-2, -1)


# name -> (spelling, the Spec's scale, the Spec's softcap)
FUSED: dict[str, tuple[Callable[..., Tensor], float, float | None]] = {
    "scale_zero": (lambda q, k, v: (_qk(q, k) * 0.0).softmax(-1) @ v, 0.0, None),
    "scale_negative": (lambda q, k, v: (_qk(q, k) * -0.5).softmax(-1) @ v, -0.5, None),
    "scale_tiny": (lambda q, k, v: (_qk(q, k) * 1e-30).softmax(-1) @ v, 1e-30, None),
    "divided_by_negative": (lambda q, k, v: (_qk(q, k) / -4.0).softmax(-1) @ v, -0.25, None),
    "zero_on_query": (lambda q, k, v: ((q * 0.0) @ k.transpose(-2, -1)).softmax(-1) @ v, 0.0, None),
    "softcap_negative": (
        lambda q, k, v: (torch.tanh(_qk(q, k) * 0.25 / -3.0) * -3.0).softmax(-1) @ v,
        0.25,
        3.0,  # c·tanh(x/c) is even in c
    ),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_scalar_edge_values_fuse_with_eager_numerics(name: str) -> None:
    fn, scale, softcap = FUSED[name]
    inputs = _inputs()
    gm, ctx = fuse(Attend(fn), inputs)
    (spec,) = assert_fused(gm, ctx)
    assert isinstance(spec, AttentionSpec) and spec.scale == scale and spec.softcap == softcap
    torch.testing.assert_close(gm(*inputs), Attend(fn)(*inputs), atol=1e-5, rtol=1e-5)


DECLINED: dict[str, tuple[Callable[..., Tensor], str]] = {
    "divided_by_zero": (lambda q, k, v: (_qk(q, k) / 0.0).softmax(-1) @ v, "divided by zero"),
    "softcap_zero": (lambda q, k, v: (torch.tanh(_qk(q, k) / 0.0) * 0.0).softmax(-1) @ v, "softcap of 0"),
}


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_meaningless_scalars_decline(name: str) -> None:
    fn, words = DECLINED[name]
    _, ctx = fuse(Attend(fn), _inputs())
    assert len(sites(ctx, "attention", "declined")) == 1 and words in reasons(ctx)[0], reasons(ctx)


class BufferScaled(nn.Module):
    """Attention scaled by a 0-d buffer: a tensor, which the fused op cannot take as its scale."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.25))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return (_qk(q, k) * self.scale).softmax(-1) @ v


def test_tensor_scale_declines_with_advice() -> None:
    _, ctx = fuse(BufferScaled(), _inputs())
    assert "tensor-valued factor" in reasons(ctx)[0]
    (advice,) = [a for a in ctx.advice if a.key == "tensor_attention_scale"]
    assert "Python float" in advice.fix


class EpsNorm(nn.Module):
    def __init__(self, eps: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def test_norm_eps_zero_is_kept() -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    gm, ctx = run_pass(NormPass(), EpsNorm(0.0), (x,))
    (site,) = sites(ctx, "rmsnorm", "fused")
    assert isinstance(site.spec, NormSpec) and site.spec.eps == 0.0 and site.spec.dynamic_scalars == ()
    torch.testing.assert_close(gm(x), EpsNorm(0.0)(x))


def test_tensor_eps_declines_with_advice() -> None:
    x = torch.randn(3, 8)
    _, ctx = run_pass(NormPass(), EpsNorm(torch.tensor(1e-6)), (x,))
    assert "eps is a tensor" in reasons(ctx)[0]
    assert [a.key for a in ctx.advice] == ["tensor_norm_eps"]
