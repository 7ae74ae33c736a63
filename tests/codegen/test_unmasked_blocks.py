"""The unmasked-tile ranges of the attention kernels (attention_tiles.unmasked_key_blocks / _query_blocks): every
tile they call clean really has no masked pair, and every such tile is in the range (so the fast loop is not
left unused), checked by brute force over causal/window/bottom-right shapes, then end to end on the kernels."""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from tilefuse.codegen import reference as ref
from tilefuse.codegen.attention_bwd import attention_backward_triton
from tilefuse.codegen.attention_fwd import attention_forward_triton
from tilefuse.codegen.attention_tiles import unmasked_key_blocks, unmasked_query_blocks

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")


@triton.jit
def _probe_key_blocks(Out, blk_lo, blk_hi, first_pos, last_pos, kv_len, window,  # type: ignore[no-untyped-def]
                      BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr):  # fmt: skip
    c_lo, c_hi = unmasked_key_blocks(blk_lo, blk_hi, first_pos, last_pos, kv_len, window, BLOCK_N, CAUSAL, USE_WINDOW)
    tl.store(Out, c_lo)
    tl.store(Out + 1, c_hi)


@triton.jit
def _probe_query_blocks(Out, lo, num_blocks, start_n, q_len, kv_len, window, pos_offset,  # type: ignore[no-untyped-def]
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        USE_WINDOW: tl.constexpr):  # fmt: skip
    i_lo, i_hi = unmasked_query_blocks(
        lo, num_blocks, start_n, q_len, kv_len, window, pos_offset, BLOCK_M, BLOCK_N, CAUSAL, USE_WINDOW
    )
    tl.store(Out, i_lo)
    tl.store(Out + 1, i_hi)


def _kept(q_pos: int, key: int, causal: bool, window: int) -> bool:
    return (not causal or key <= q_pos) and (window <= 0 or q_pos - key < window)


def _clean(rows: range, keys: range, q_len: int, kv_len: int, pos_offset: int, causal: bool, window: int) -> bool:
    return all(r < q_len for r in rows) and all(k < kv_len for k in keys) and all(
        _kept(r + pos_offset, k, causal, window) for r in rows for k in keys
    )  # fmt: skip


# kv_len - q_len (the bottom-right offset) takes every residue mod 16 that moves a block boundary
SHAPES = [(40, 33), (64, 64), (17, 70), (70, 17), (48, 96)] + [(q, q + d) for q in (33, 48) for d in range(-17, 18, 2)]
SHAPES += [(37, 37 + d) for d in (-16, -14, -2, 0, 2, 14, 16)]
FLAGS = [(causal, window, bottom_right) for causal in (False, True) for window in (0, 5, 20) for bottom_right in
         ((False, True) if causal else (False,))]  # fmt: skip


@pytest.mark.parametrize(("causal", "window", "bottom_right"), FLAGS)
def test_key_block_range_is_exactly_the_clean_blocks(causal: bool, window: int, bottom_right: bool) -> None:
    """Per query block of the forward/dQ loops: [c_lo, c_hi) = the key blocks with no masked pair (forward: rows
    past q_len never count; they are not stored)."""
    out = torch.zeros(2, dtype=torch.int32)
    for (q_len, kv_len), (bm, bn) in itertools.product(SHAPES, [(16, 16), (32, 16), (16, 32)]):
        pos_offset = kv_len - q_len if bottom_right else 0
        for start_m in range(0, q_len, bm):
            first_pos, last_pos = start_m + pos_offset, min(start_m + bm, q_len) - 1 + pos_offset
            lo, hi = 0, kv_len  # the kernel's key range
            if causal:
                hi = min(hi, last_pos + 1)
            if window:
                lo = max(first_pos - window + 1, 0) // bn * bn
            blk_lo, blk_hi = lo // bn, lo // bn + max(-(-(hi - lo) // bn), 0)
            _probe_key_blocks[(1,)](out, blk_lo, blk_hi, first_pos, last_pos, kv_len, window, BLOCK_N=bn,
                                    CAUSAL=causal, USE_WINDOW=window > 0)  # fmt: skip
            rows = range(start_m, min(start_m + bm, q_len))
            want = [b for b in range(blk_lo, blk_hi)
                    if _clean(rows, range(b * bn, b * bn + bn), q_len, kv_len, pos_offset, causal, window)]  # fmt: skip
            got = list(range(int(out[0]), int(out[1])))
            assert got == want, (q_len, kv_len, bm, bn, start_m)


@pytest.mark.parametrize(("causal", "window", "bottom_right"), FLAGS)
def test_query_block_range_is_exactly_the_clean_blocks(causal: bool, window: int, bottom_right: bool) -> None:
    """Per key block of the dK/dV loop: [i_lo, i_hi) = the query blocks of real rows with no masked pair."""
    out = torch.zeros(2, dtype=torch.int32)
    for (q_len, kv_len), (bm, bn) in itertools.product(SHAPES, [(16, 16), (32, 16), (16, 32)]):
        pos_offset = kv_len - q_len if bottom_right else 0
        for start_n in range(0, kv_len, bn):
            lo, hi = 0, q_len  # the kernel's query range
            if causal:
                lo = max(start_n - pos_offset, 0) // bm * bm
            if window:
                hi = min(hi, min(start_n + bn, kv_len) - 1 + window - pos_offset)
            num_blocks = max(-(-(hi - lo) // bm), 0)
            _probe_query_blocks[(1,)](out, lo, num_blocks, start_n, q_len, kv_len, window, pos_offset, BLOCK_M=bm,
                                      BLOCK_N=bn, CAUSAL=causal, USE_WINDOW=window > 0)  # fmt: skip
            keys = range(start_n, start_n + bn)
            blocks = [range(lo + i * bm, lo + i * bm + bm) for i in range(num_blocks)]
            want = [i for i, rows in enumerate(blocks) if _clean(rows, keys, q_len, kv_len, pos_offset, causal, window)]
            got = list(range(int(out[0]), int(out[1])))
            assert got == want, (q_len, kv_len, bm, bn, start_n)


CASES = [("causal", (100, 90)), ("causal_br", (90, 100)), ("causal_br", (100, 90)), ("window", (96, 96)),
         ("causal_window", (100, 100)), ("alibi_causal", (80, 80)), ("softcap_window", (70, 90))]  # fmt: skip


@pytest.mark.parametrize(("variant", "shape"), CASES, ids=[f"{v}-{s[0]}x{s[1]}" for v, s in CASES])
def test_kernels_mixing_clean_and_masked_tiles_match_fp64(variant: str, shape: tuple[int, int]) -> None:
    """Forward and backward with 16-wide tiles, where most tiles take the unmasked loop: outputs and gradients
    against an fp64 golden, within twice / three times the fp32 eager error."""
    q_len, kv_len = shape
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, h, n, 16, generator=gen) for h, n in ((4, q_len), (2, kv_len), (2, kv_len)))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if variant.startswith("alibi") else None
    inputs = ref.AttnInputs(q, k, v, alibi_slopes=slopes)
    flags = ref.AttnFlags(
        0.3, causal="causal" in variant, bottom_right=variant.endswith("_br"),
        window=9 if "window" in variant else 0, softcap=5.0 if "softcap" in variant else 0.0,
    )  # fmt: skip
    out, lse = attention_forward_triton(inputs, flags, block_m=16, block_n=16)
    as64 = ref.AttnInputs(q.double(), k.double(), v.double(), alibi_slopes=None if slopes is None else slopes.double())
    golden = ref.attention_forward(as64, flags)
    eager = ref.attention_forward(inputs, flags)
    floor = 8 * torch.finfo(torch.float32).eps
    assert torch.isfinite(out).all()
    assert (out.double() - golden).abs().max() <= 2 * (eager.double() - golden).abs().max() + floor
    grad = torch.randn(out.shape, generator=gen)
    grads = attention_backward_triton(grad, inputs, flags, out, lse, block_m=16, block_n=16)
    for got, want64, want32 in zip(grads, ref.attention_backward(grad.double(), as64, flags),
                                   ref.attention_backward(grad, inputs, flags), strict=True):  # fmt: skip
        assert torch.isfinite(got).all()
        assert (got.double() - want64).abs().max() <= 3 * (want32.double() - want64).abs().max() + floor
