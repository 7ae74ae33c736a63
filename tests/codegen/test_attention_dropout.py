"""Dropout inside the Triton attention kernels (interpreter): the in-kernel Philox keep mask is reference.dropout_keep
exactly, outputs match the reference with the same rng, gradients match the fp64 golden with the same mask."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton", reason="triton is not installed; the Triton attention kernels cannot run")

from test_attention_bwd_kernel import _check_against_golden, _with_rope
from test_attention_fwd_kernel import _make_inputs

from tilefuse.codegen import reference as ref
from tilefuse.codegen.attention_bwd import attention_backward_triton
from tilefuse.codegen.attention_fwd import attention_forward_triton

RNG = torch.tensor([20240611, 2**33 + 7], dtype=torch.int64)  # an offset past 2^32 uses the counter's high word


def _kernel_keep_mask(batch: int, q_heads: int, q_len: int, kv_len: int, p: float, group: int = 2) -> Tensor:
    """The kernel's keep mask, read off its output: q = k = 0 gives P = 1/Nk, and V = I makes out[..., i, j] the
    dropped P[i, j] = keep·(1/(1-p))/Nk, so out != 0 exactly where the kernel kept (i, j)."""
    q = torch.zeros(batch, q_heads, q_len, 16)
    k = torch.zeros(batch, q_heads // group, kv_len, 16)
    v = torch.eye(kv_len).expand(batch, q_heads // group, kv_len, kv_len).contiguous()
    out, _ = attention_forward_triton(ref.AttnInputs(q, k, v, rng=RNG), ref.AttnFlags(scale=1.0, dropout_p=p))
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / ((1 - p) * kv_len)))
    return kept


def test_kernel_keep_mask_is_reference_dropout_keep() -> None:
    kept = _kernel_keep_mask(2, 4, 17, 20, 0.3)
    assert torch.equal(kept, ref.dropout_keep(RNG, (2, 4, 17, 20), 0.3))


def test_kept_fraction_is_one_minus_p() -> None:
    kept = _kernel_keep_mask(2, 2, 64, 64, 0.4, group=1)
    assert abs(kept.float().mean().item() - 0.6) < 0.015  # 8192 draws: about 3.5 standard deviations


@pytest.mark.parametrize("variant", ["plain", "causal_bottom_right", "key_padding", "softcap", "alibi"])
def test_forward_matches_reference_with_same_rng(variant: str) -> None:
    inputs, flags = _make_inputs(33, 20, 16, 2, torch.float32, variant)
    inputs, flags = inputs._replace(rng=RNG), flags._replace(dropout_p=0.25)
    out, lse = attention_forward_triton(inputs, flags, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref.attention_forward(inputs, flags), rtol=1e-5, atol=1e-5)
    # lse belongs to the softmax, before dropout.
    _, lse_plain = attention_forward_triton(inputs, flags._replace(dropout_p=0.0), block_m=16, block_n=16)
    assert torch.equal(lse, lse_plain)


def test_p_zero_is_identical_to_no_dropout() -> None:
    inputs, flags = _make_inputs(17, 20, 16, 2, torch.float32, "causal_bottom_right")
    grad_out = torch.randn(2, 4, 17, 16)
    plain = attention_forward_triton(inputs, flags)
    with_rng = attention_forward_triton(inputs._replace(rng=RNG), flags._replace(dropout_p=0.0))
    assert all(torch.equal(a, b) for a, b in zip(plain, with_rng, strict=True))
    grads = attention_backward_triton(grad_out, inputs, flags, *plain)
    grads_rng = attention_backward_triton(grad_out, inputs._replace(rng=RNG), flags._replace(dropout_p=0.0), *plain)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_rng, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["plain", "causal_top_left", "softcap"])
def test_gradients_match_golden_with_same_mask(variant: str, dtype: torch.dtype) -> None:
    """16-wide tiles: several query and key blocks, dK/dV over both heads of a GQA group redraw the same mask."""
    inputs, flags = _make_inputs(33, 40, 16, 2, dtype, variant)
    _check_against_golden(inputs._replace(rng=RNG), flags._replace(dropout_p=0.3), block_m=16, block_n=16)


def test_gradients_with_rope_and_dropout() -> None:
    inputs, flags = _with_rope("inter_partial", torch.float32)
    _check_against_golden(inputs._replace(rng=RNG), flags._replace(dropout_p=0.2))


def test_dropout_actually_drops() -> None:
    inputs, flags = _make_inputs(17, 20, 16, 1, torch.float32)
    out, _ = attention_forward_triton(inputs._replace(rng=RNG), flags._replace(dropout_p=0.5))
    assert (out - ref.attention_forward(inputs, flags)).abs().max().item() > 0.1


@pytest.mark.parametrize(
    ("p", "rng", "match"),
    [
        (1.0, RNG, "dropout_p must be in"),
        (-0.1, RNG, "dropout_p must be in"),
        (0.1, None, "needs rng"),
        (0.1, RNG.to(torch.int32), "needs rng"),
        (0.1, RNG[:1], "needs rng"),
    ],
    ids=["p1", "negative", "no rng", "int32 rng", "short rng"],
)
def test_invalid_dropout_arguments_raise(p: float, rng: Tensor | None, match: str) -> None:
    inputs, flags = _make_inputs(4, 4, 16, 1, torch.float32)
    inputs, flags = inputs._replace(rng=rng), flags._replace(dropout_p=p)
    with pytest.raises(ValueError, match=match):
        attention_forward_triton(inputs, flags)
    grad = torch.zeros(2, 2, 4, 16)
    with pytest.raises(ValueError, match=match):
        attention_backward_triton(grad, inputs, flags, grad, torch.zeros(2, 2, 4))
