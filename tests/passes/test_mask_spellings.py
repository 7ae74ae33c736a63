"""Causal masks spelled as current models spell them, proven causal (no N×N data mask): MPT's additive mask cast
to bool, T5's viewed causal mask combined with a learned bias under SDPA (`.contiguous()`), and a causal tensor
built in the graph then sliced to the sequence (top-left and bottom-right)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _attention_cases import Attend, Shape, qkv
from _helpers import assert_fused, fuse
from torch import Tensor

MIN = torch.finfo(torch.float32).min
BLOCK = 24  # a larger causal tensor, sliced per call


def _scores(q: Tensor, k: Tensor) -> Tensor:
    return q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5


def additive_cast_to_bool(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """MPT: HF's additive mask `where(keep, 0, min)` cast to bool marks the masked positions."""
    nq, nk = q.shape[-2], k.shape[-2]
    keep = torch.arange(nq)[:, None] >= torch.arange(nk)[None, :]
    masked = torch.where(keep, 0.0, MIN)[None, None].to(torch.bool)
    return _scores(q, k).masked_fill(masked, MIN).softmax(-1) @ v


def viewed_causal_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """T5 under SDPA: the causal mask viewed [1, 1, Nq, Nk] selects the learned bias, then `.contiguous()`."""
    nq, nk = q.shape[-2], k.shape[-2]
    causal = (torch.arange(nq)[:, None] >= torch.arange(nk)[None, :]).view(1, 1, nq, nk)
    mask = torch.where(causal, bias, MIN).contiguous()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sliced_tril(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """A causal tensor larger than the sequence, built in the graph and sliced to the last Nq rows."""
    nq, nk = q.shape[-2], k.shape[-2]
    keep = torch.tril(torch.ones(BLOCK, BLOCK))[None, None, nk - nq : nk, :nk]
    return _scores(q, k).masked_fill(keep == 0, MIN).softmax(-1) @ v


def sliced_band(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """A band (causal, window 4) built in the graph and sliced to the sequence."""
    n = q.shape[-2]
    ones = torch.ones(BLOCK, BLOCK, dtype=torch.bool)
    keep = (torch.tril(ones) & torch.triu(ones, -3))[:n, :n]
    return _scores(q, k).masked_fill(~keep, MIN).softmax(-1) @ v


def _bias(shape: Shape) -> Tensor:
    return torch.randn(1, 4, shape.nq, shape.nk, generator=torch.Generator().manual_seed(1))


CASES: dict[str, tuple[Callable[..., Tensor], str, int | None, str]] = {  # fn, align, window, data mask
    "additive_cast_to_bool": (additive_cast_to_bool, "top_left", None, "none"),
    "sliced_tril": (sliced_tril, "bottom_right", None, "none"),
    "sliced_band": (sliced_band, "top_left", 4, "none"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_causal_spelling_proven(name: str) -> None:
    fn, align, window, mask = CASES[name]
    shape = Shape(17, 17, 16) if name == "sliced_band" else Shape(5, 17, 16) if "sliced" in name else Shape(9, 9, 16)
    inputs = qkv(shape, torch.Generator().manual_seed(0))
    gm, ctx = fuse(Attend(fn), inputs)
    (spec,) = assert_fused(gm, ctx)
    assert (spec.causal, spec.window, spec.mask) == (True, window, mask)
    assert spec.align == align or shape.nq == shape.nk
    torch.testing.assert_close(gm(*inputs), Attend(fn)(*inputs), atol=1e-5, rtol=1e-5)


def test_viewed_causal_mask_with_learned_bias() -> None:
    shape = Shape(9, 9, 16)
    inputs = (*qkv(shape, torch.Generator().manual_seed(0)), _bias(shape))
    gm, ctx = fuse(Attend(viewed_causal_with_bias), inputs)
    (spec,) = assert_fused(gm, ctx)
    assert spec.causal and spec.mask == "additive"  # the bias stays a tensor, the causal part is a flag
    torch.testing.assert_close(gm(*inputs), Attend(viewed_causal_with_bias)(*inputs), atol=1e-5, rtol=1e-5)
