"""Attention masks at op level: every shape that broadcasts to [B, Hq, Nq, Nk] runs on the CPU path and on the
kernels (interpreter), forward and backward; integer masks and masks that would grow the output are refused with a
clear error; the sliding window keeps what ops.attention's docstring says.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tilefuse  # noqa: F401  (registers the backend)
from tilefuse import ops
from tilefuse.codegen import reference as ref

B, HQ, HK, NQ, NK, D = 2, 4, 2, 5, 11, 8
SCALE = 0.4
MASK_SHAPES = [
    (B, HQ, NQ, NK), (1, HQ, NQ, NK), (B, 1, NQ, NK), (B, HQ, 1, NK), (1, 1, NQ, NK), (B, 1, 1, NK), (1, 1, 1, NK),
    (B, 1, NQ, 1), (HQ, NQ, NK), (HQ, 1, NK), (NQ, NK), (1, NK), (NK,),
]  # fmt: skip


def _mask(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    if dtype != torch.bool:
        return torch.randn(shape, generator=gen).to(dtype)
    keep = torch.rand(shape, generator=gen) > 0.4
    keep[..., 0] = True  # key 0 is visible to every query (bottom-right causal), so no row is fully masked
    return keep


def _qkv(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.randn(B, HQ, NQ, D, generator=gen, dtype=dtype)
    return (
        q,
        torch.randn(B, HK, NK, D, generator=gen, dtype=dtype),
        torch.randn(B, HK, NK, D, generator=gen, dtype=dtype),
    )


def _golden(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Eager SDPA in fp64, bottom-right causal written into the mask."""
    causal = torch.ones(NQ, NK, dtype=torch.bool).tril(NK - NQ)
    full = causal & mask if mask.dtype == torch.bool else mask.double().masked_fill(~causal, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=SCALE, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_every_broadcast_mask_shape_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    mask = _mask(shape, dtype, gen)
    q, k, v = (t.requires_grad_(True) for t in _qkv(gen))
    out = ops.attention(q, k, v, causal=True, scale=SCALE, attn_mask=mask)
    grad = torch.randn(out.shape, generator=gen)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = _golden(q64, k64, v64, mask)
    wants = [want, *torch.autograd.grad(want, (q64, k64, v64), grad.double())]
    for g, w in zip(got, wants, strict=True):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((B, 1, NQ, NK), torch.bool), ((1, HQ, 1, NK), torch.float32), ((NK,), torch.bool), ((B, 1, NQ, 1), torch.float32),
     ((HQ, NQ, NK), torch.bool)],
    ids=str,
)  # fmt: skip
def test_broadcast_mask_shapes_kernels(
    shape: tuple[int, ...], dtype: torch.dtype, caplog: pytest.LogCaptureFixture
) -> None:
    """The forward and backward kernels (interpreter) on lower-rank and size-1-dim masks, against the reference."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter")
    from tilefuse.codegen import cpu, gpu

    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(gen)
    inputs, flags = ref.AttnInputs(q, k, v, _mask(shape, dtype, gen)), ref.AttnFlags(SCALE, True, True)
    with caplog.at_level(logging.DEBUG, logger="tilefuse.codegen"):
        out, lse = gpu.attention_with_lse(inputs, flags)
        grad = torch.randn(out.shape, generator=gen)
        grads = gpu.attention_backward(grad, inputs, flags, out, lse)
    assert not [r for r in caplog.records if "reference" in r.getMessage()]
    torch.testing.assert_close(out, ref.attention_forward(inputs, flags), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, cpu.attention_lse(inputs, flags), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref.attention_backward(grad, inputs, flags), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int8])
def test_integer_mask_is_a_type_error(dtype: torch.dtype) -> None:
    q, k, v = _qkv(torch.Generator().manual_seed(0))
    mask = torch.ones(NQ, NK, dtype=dtype)
    with pytest.raises(TypeError, match=r"bool .* floating"):
        ops.attention(q, k, v, attn_mask=mask)
    with pytest.raises(TypeError, match=r"bool .* floating"):  # the op itself, as a rewritten graph calls it
        torch.ops.tilefuse.attention(q, k, v, mask, None, None, None, SCALE, False, False, 0, 0.0, -1, 0)


@pytest.mark.parametrize("shape", [(2 * B, 1, NQ, NK), (B, 2 * HQ, NQ, NK), (B, 1, 1, NQ, NK), (NQ + 1, NK)], ids=str)
def test_mask_that_grows_the_output_is_a_value_error(shape: tuple[int, ...]) -> None:
    """A mask that broadcasts with q only by growing it (more batches or heads) is refused by the op, eagerly and
    when traced (fake), instead of failing inside the flash CPU kernel at run time."""
    q, k, v = _qkv(torch.Generator().manual_seed(0))
    mask = torch.ones(shape, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.attention(q, k, v, attn_mask=mask)
    args = (q, k, v, mask, None, None, None, SCALE, False, False, 0, 0.0, -1, 0)
    with pytest.raises(ValueError, match="does not broadcast"):
        torch.ops.tilefuse.attention(*args)
    with torch._subclasses.FakeTensorMode() as mode, pytest.raises(ValueError, match="does not broadcast"):
        torch.ops.tilefuse.attention(*(mode.from_tensor(a) if isinstance(a, Tensor) else a for a in args))


class _PerDocumentAttention(nn.Module):
    """Matmul-spelled attention of one [1, H, N, D] q/k/v against a per-document [B, 1, N, N] mask: in eager the
    mask's batch broadcasts the output to [B, H, N, D]."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, doc: Tensor) -> Tensor:
        keep = doc[:, None, :, None] == doc[:, None, None, :]
        scores = (q @ k.transpose(-1, -2) * SCALE).masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ v


def test_per_document_mask_wider_than_q_does_not_crash_at_run_time() -> None:
    """It used to compile, then fail when run: RuntimeError: shape '[1, 1, 16, 16]' is invalid for input of size
    512, from the flash CPU kernel. Now the op's fake refuses it at compile time and the graph runs unfused."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen) for _ in range(3))
    doc = torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7])
    model = _PerDocumentAttention()
    compiled = torch.compile(model, backend="tilefuse", options={"inner": "eager"})
    torch.testing.assert_close(compiled(q, k, v, doc), model(q, k, v, doc))


@pytest.mark.parametrize(("q_len", "align"), [(NK, "top_left"), (NQ, "bottom_right"), (NQ, "top_left")])
@pytest.mark.parametrize("causal", [False, True])
def test_window_keeps_the_most_recent_positions(q_len: int, align: str, causal: bool) -> None:
    """window=w keeps keys j with pos(i) - j < w, and later keys too unless causal (as ops.attention documents)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 1, q_len, D, generator=gen), *(torch.randn(1, 1, NK, D, generator=gen) for _ in range(2))
    window = 3
    pos = torch.arange(q_len)[:, None] + (NK - q_len if align == "bottom_right" else 0)
    keys = torch.arange(NK)[None, :]
    keep = (pos - keys < window) & ((keys <= pos) if causal else True)
    got = ops.attention(q, k, v, causal=causal, window=window, align=align, scale=SCALE)  # type: ignore[arg-type]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=SCALE)
    torch.testing.assert_close(got, want.nan_to_num(0.0), atol=1e-5, rtol=1e-5)
