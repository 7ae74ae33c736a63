"""Scalar arguments at their edges, on every path: scale 0 (uniform attention, never "no scale given"), negative
and tiny scales, softcap, dropout_p and eps edge values; values with no meaning are a ValueError naming them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tilefuse import ops
from tilefuse.codegen import cpu
from tilefuse.codegen import reference as ref

B, HQ, HK, NQ, NK, D = 1, 2, 1, 6, 9, 8
SCALES = [0.0, -0.0, -0.7, 1e-30, -1e-30, 3.0]


def _qkv(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, NQ, D, generator=gen), torch.randn(B, HK, NK, D, generator=gen),
            torch.randn(B, HK, NK, D, generator=gen))  # fmt: skip


def _golden(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float | None) -> Tensor:
    """fp64 eager attention, bottom-right causal: softmax(cap·tanh(scale·qkᵀ/cap) or scale·qkᵀ) v."""
    q, k, v = q.double(), k.double().repeat_interleave(HQ // HK, 1), v.double().repeat_interleave(HQ // HK, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keep = torch.ones(NQ, NK, dtype=torch.bool).tril(NK - NQ)
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("softcap", [None, 1e-3, 2.0])
@pytest.mark.parametrize("scale", SCALES)
def test_attention_scale_cpu(scale: float, softcap: float | None) -> None:
    """CPU path: the flash CPU kernel (no softcap) or the reference (softcap), forward and backward."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(1))
    out = ops.attention(q, k, v, causal=True, scale=scale, softcap=softcap)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = _golden(q64, k64, v64, scale, softcap)
    wants = [want, *torch.autograd.grad(want, (q64, k64, v64), grad.double())]
    for g, w in zip(got, wants, strict=True):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-5)


def test_scale_zero_is_uniform_attention() -> None:
    """scale=0 weighs every kept key equally: each query gets the mean of the values it may see."""
    q, k, v = _qkv(3)
    out = ops.attention(q, k, v, causal=True, scale=0.0)
    seen = torch.arange(NQ) + NK - NQ + 1  # keys visible to each query, bottom-right causal
    want = v.repeat_interleave(HQ // HK, 1).cumsum(dim=2)[:, :, NK - NQ :] / seen[:, None]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    inputs, flags = ref.AttnInputs(q, k, v), ref.AttnFlags(0.0, True, True)
    torch.testing.assert_close(cpu.attention(inputs, flags), want, atol=1e-6, rtol=1e-5)  # SDPA's CPU path too


@pytest.mark.parametrize(("scale", "softcap"), [(0.0, None), (-0.7, None), (1e-30, None), (0.0, 1e-3), (-0.7, 2.0)])
def test_attention_scale_kernels(scale: float, softcap: float | None, caplog: pytest.LogCaptureFixture) -> None:
    """The forward and backward kernels (interpreter) against the reference at the same scalars."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter")
    from tilefuse.codegen import gpu

    q, k, v = _qkv(4)
    inputs, flags = ref.AttnInputs(q, k, v), ref.AttnFlags(scale, True, True, 0, softcap or 0.0)
    with caplog.at_level(logging.DEBUG, logger="tilefuse.codegen"):
        out, lse = gpu.attention_with_lse(inputs, flags)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        grads = gpu.attention_backward(grad, inputs, flags, out, lse)
    assert not [r for r in caplog.records if "reference" in r.getMessage()]
    torch.testing.assert_close(out.double(), _golden(q, k, v, scale, softcap), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, cpu.attention_lse(inputs, flags), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref.attention_backward(grad, inputs, flags), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scale=math.nan), "scale"), (dict(scale=math.inf), "scale"), (dict(scale=-math.inf), "scale"),
        (dict(softcap=0.0), "softcap"), (dict(softcap=-1.0), "softcap"), (dict(softcap=math.inf), "softcap"),
        (dict(softcap=math.nan), "softcap"), (dict(dropout_p=1.0), "dropout_p"), (dict(dropout_p=-0.1), "dropout_p"),
        (dict(dropout_p=math.nan), "dropout_p"), (dict(window=0), "window"), (dict(window=-2), "window"),
        (dict(window=True), "window"), (dict(window=2.5), "window"),
    ],
    ids=str,
)  # fmt: skip
def test_meaningless_attention_scalars_are_value_errors(kwargs: dict, match: str) -> None:
    q, k, v = _qkv(0)
    with pytest.raises(ValueError, match=match):
        ops.attention(q, k, v, **kwargs)


def test_tiny_dropout_and_zero_dropout() -> None:
    """dropout_p=0.0 is no dropout (no rng drawn, bitwise the plain call); a tiny p drops nothing here and only
    rescales by 1/(1-p)."""
    q, k, v = _qkv(6)
    plain = ops.attention(q, k, v, causal=True)
    torch.testing.assert_close(ops.attention(q, k, v, causal=True, dropout_p=0.0), plain, atol=0, rtol=0)
    torch.manual_seed(0)
    torch.testing.assert_close(ops.attention(q, k, v, causal=True, dropout_p=1e-7), plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("eps", [1e-30, 1e-6, 10.0])
@pytest.mark.parametrize("rms", [True, False])
def test_norm_eps_edges(eps: float, rms: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(3, 16, generator=gen) * 1e-3, torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    x64 = x.double()
    if rms:
        got, want = ops.rms_norm(x, w, eps), F.rms_norm(x64, (16,), w.double(), eps)
    else:
        got, want = ops.layer_norm(x, w, b, eps), F.layer_norm(x64, (16,), w.double(), b.double(), eps)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # type: ignore[union-attr]


@pytest.mark.parametrize("eps", [0.0, -1e-6, math.nan])
def test_meaningless_eps_is_a_value_error(eps: float) -> None:
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, None, eps)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(x, None, None, eps)


@pytest.mark.parametrize("offset", [0.0, 1.0, -1.0])
def test_rms_norm_weight_offset_zero_and_nonzero(offset: float) -> None:
    """weight_offset 0.0 is a value like any other (Gemma's 1 + w uses 1.0)."""
    gen = torch.Generator().manual_seed(8)
    x, w = torch.randn(3, 16, generator=gen), torch.randn(16, generator=gen)
    want = F.rms_norm(x.double(), (16,), w.double() + offset, 1e-6)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, weight_offset=offset).double(), want, atol=1e-5, rtol=1e-5)
