"""FlashAttention-2 style Triton forward kernel for reference.attention_forward, and its launcher.

One program computes BLOCK_M query rows of one (batch, q_head) with an fp32 online softmax over key blocks and
returns the output plus the natural-log log-sum-exp ([B, Hq, Nq], fp32) that the backward pass recomputes from.
RoPE (reference.rope_qk) is applied to the Q tile and to each K tile as they are loaded, in fp32, rounded back to
q's dtype; cos/sin rows are each tensor's own sequence positions. Dropout (reference.dropout_keep) draws its keep
mask in-kernel from Philox counters, so the backward redraws it instead of reading a stored mask.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..specs import KERNEL_MASK_ADDITIVE, KERNEL_MASK_BOOL, KERNEL_MASK_NONE
from . import emit
from .attention_args import MAX_HEAD_DIM as MAX_HEAD_DIM  # re-exported: plan.py and others import it from here
from .attention_args import SUPPORTED_DTYPES as SUPPORTED_DTYPES
from .attention_args import broadcast_strides as broadcast_strides
from .attention_args import check_extras as check_extras
from .attention_args import check_tensors as check_tensors
from .attention_args import dropout_args, mask_block_list, rope_args
from .attention_tiles import (
    dropout_keep_tile,
    dropout_rows,
    listed_blocks,
    load_kt,
    nth_block,
    online_softmax,
    softmax_finish,
    unmasked_key_blocks,
)
from .attention_tiles import rope_tile as rope_tile
from .attention_tiles import tile_dot as tile_dot
from .attention_tiles import tile_tanh as tile_tanh
from .layouts import empty_in_order
from .reference import AttnFlags, AttnInputs

LOG2E = math.log2(math.e)
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = KERNEL_MASK_NONE, KERNEL_MASK_BOOL, KERNEL_MASK_ADDITIVE  # specs.kernel_mask_kind


@triton.jit
def attention_fwd_kernel(  # type: ignore[no-untyped-def]
    Q, K, V, Out, Lse, Mask, Alibi, Cos, Sin, Rng, BlockIdx, BlockCount,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_cb, stride_ch, stride_cn, stride_cd,
    stride_sb, stride_sh, stride_sn, stride_sd,
    stride_ib, stride_ih, stride_im, stride_nb, stride_nh, stride_nm,
    num_q_heads, group, q_len, kv_len, head_dim, head_dim_v, rotary_dim,
    qk_scale, softcap_log2, window, pos_offset, drop_p, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROPE_LAYOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SKIP_TILES: tl.constexpr, SCALE_IN_EXP: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_q_heads).to(tl.int64)  # int64 so batch/head offsets cannot overflow past 2^31
    off_h = (pid_bh % num_q_heads).to(tl.int64)
    off_kvh = off_h // group  # GQA: the kv head is shared, never repeated in memory
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_pos = offs_m + pos_offset  # query positions in key coordinates (bottom-right alignment shifts them)

    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim),
        other=0.0,
    )
    if ROPE_LAYOUT >= 0:  # RoPE on the loaded tile; cos/sin rows are the query rows (ROPE_LAYOUT -1: none)
        q = rope_tile(
            q, q_base, Cos + off_b * stride_cb + off_h * stride_ch, Sin + off_b * stride_sb + off_h * stride_sh,
            offs_m[:, None], offs_d[None, :], offs_m[:, None] < q_len, offs_d[None, :] < head_dim,
            stride_qm, stride_qd, stride_cn, stride_cd, stride_sn, stride_sd, rotary_dim, ROPE_LAYOUT,
        )  # fmt: skip
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * 1.4426950408889634
    if HAS_DROPOUT:
        seed, row_counter = dropout_rows(Rng, pid_bh.to(tl.int64) * q_len + offs_m, kv_len)

    # Key-block range of this query block: blocks entirely outside causal/window are never loaded.
    lo = 0
    hi = kv_len
    first_pos = start_m * BLOCK_M + pos_offset
    last_pos = tl.minimum(start_m * BLOCK_M + BLOCK_M, q_len) - 1 + pos_offset
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
    if USE_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    blk_lo = lo // BLOCK_N
    blk_hi = blk_lo + tl.cdiv(hi - lo, BLOCK_N)
    idx_base = BlockIdx  # None-safe: only offset (and read) under SKIP_TILES
    if SKIP_TILES:
        # The launcher's list of this query block: full tiles [0, c_hi) run clean, then n_masked tiles masked.
        idx_base, c_hi, n_masked = listed_blocks(
            BlockIdx, BlockCount, off_b, off_h, start_m, stride_ib, stride_ih, stride_im, stride_nb, stride_nh,
            stride_nm,
        )  # fmt: skip
        c_lo = 0
    else:
        # Clean blocks [c_lo, c_hi): inside kv_len and kept whole by causal/window for every row of this query
        # block (last key <= the first row's position; first key inside the last row's window), so their scores
        # skip the masking. The rest — the diagonal, the window's edge, a partial last block — run masked. A data
        # mask without a list runs masked throughout.
        c_lo = blk_lo
        c_hi = blk_lo
        if MASK_KIND == 0:
            c_lo, c_hi = unmasked_key_blocks(
                blk_lo, blk_hi, first_pos, last_pos, kv_len, window, BLOCK_N, CAUSAL, USE_WINDOW
            )
        n_masked = (c_lo - blk_lo) + (blk_hi - c_hi)

    cos_off = off_b * stride_cb + off_kvh * stride_ch
    sin_off = off_b * stride_sb + off_kvh * stride_sh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Unrolled at compile time: phase 0 = clean blocks (not compiled under a data mask without a list), 1 = masked.
    for phase in tl.static_range(0 if MASK_KIND == 0 or SKIP_TILES else 1, 2):
        num_blocks = c_hi - c_lo if phase == 0 else n_masked
        for block in range(0, num_blocks):
            offs_n = nth_block(block, blk_lo, c_lo, c_hi, idx_base, phase, SKIP_TILES) * BLOCK_N + offs_n0
            kt = load_kt(
                k_base, Cos, Sin, cos_off, sin_off, offs_n, offs_d, kv_len, head_dim,
                stride_kn, stride_kd, stride_cn, stride_cd, stride_sn, stride_sd, rotary_dim, ROPE_LAYOUT,
            )  # fmt: skip
            # Scores live in log2 units: log2(e) is folded into qk_scale (or into softcap_log2 with softcap).
            # SCALE_IN_EXP (qk_scale > 0, nothing added to the scaled scores): the softmax step scales them
            # inside its exp2 argument, one FMA per score instead of a multiply and a subtract.
            s = tile_dot(q, kt, INPUT_PRECISION, UPCAST_DOT)
            if HAS_SOFTCAP:
                s = tile_tanh(s * qk_scale) * softcap_log2
            elif not SCALE_IN_EXP:
                s = s * qk_scale
            if HAS_ALIBI:
                s += slope * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
            if phase == 1:
                keep = offs_n[None, :] < kv_len
                if CAUSAL:
                    keep &= offs_n[None, :] <= q_pos[:, None]
                if USE_WINDOW:
                    keep &= (q_pos[:, None] - offs_n[None, :]) < window
                if MASK_KIND != 0:
                    # int64 rows: one head's [Nq, Nk] mask plane passes 2^31 elements at N = 46341
                    mask_ptrs = (
                        Mask
                        + off_b * stride_mb
                        + off_h * stride_mh
                        + offs_m[:, None].to(tl.int64) * stride_mm
                        + offs_n[None, :] * stride_mn
                    )
                    in_range = (offs_m[:, None] < q_len) & (offs_n[None, :] < kv_len)
                    if MASK_KIND == 1:
                        keep &= tl.load(mask_ptrs, mask=in_range, other=0) != 0
                    else:
                        s += tl.load(mask_ptrs, mask=in_range, other=0.0).to(tl.float32) * 1.4426950408889634
                s = tl.where(keep, s, float("-inf"))

            p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, qk_scale, SCALE_IN_EXP)
            v = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < kv_len) & (offs_dv[None, :] < head_dim_v),
                other=0.0,
            )
            if HAS_DROPOUT:  # on P only: l_i above sums the undropped P, so lse and normalization are unaffected
                p = tl.where(dropout_keep_tile(seed, row_counter, offs_n, drop_p), p * drop_scale, 0.0)
            acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST_DOT)

    # Fully masked rows: l = 0, acc = 0 -> output 0 and lse = -inf.
    acc, lse2 = softmax_finish(acc, m_i, l_i)
    lse = lse2 * 0.6931471805599453
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        acc.to(Out.dtype.element_ty),
        mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < head_dim_v),
    )
    tl.store(Lse + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


# -------------------------------------------------------------------------------------------------- launcher
class BlockSizes(NamedTuple):
    m: int
    n: int
    d: int
    dv: int


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(
    head_dim: int, has_mask: bool = False, has_rope: bool = False, has_dropout: bool = False
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) used when the caller gives none.

    Chosen with `tilefuse compile-check` (launch-like specialization of a Llama prefill) so that neither the sm_90
    nor the sm_80 build spills and shared memory fits both: 128x64 tiles with 8 warps up to D=128 (3 stages
    without RoPE; RoPE's partner tiles and cos/sin take the third stage's shared memory), 64x64 at D=256 and
    32x16 for RoPE at D=256 (larger tiles spill on sm_80). Dropout's Philox state costs about a mask tile (RoPE
    with dropout: 32x32, which neither Triton 3.6 nor 3.9 spills on sm_80; RoPE with a data mask: 128x32: since
    the mask's clean loop was added 128x64 spills 8 bytes on sm_80 with Triton 3.6). The autotuner replaces
    these per shape.
    """
    if has_rope:
        if head_dim <= 128:
            return (32, 32, 8, 2) if has_dropout else (128, 32 if has_mask else 64, 8, 2)
        return 32, 16, 8, 2
    if head_dim <= 128:
        return 128, 64, 8, 2 if has_dropout else 3
    return 64, 32 if has_dropout else 64, 8, 2


def scale_in_exp(qk_scale: float, softcap: float, alibi: bool, mask_kind: int) -> bool:
    """Whether the kernel may scale scores inside the softmax's exp2 (SCALE_IN_EXP): only a positive scale keeps
    the row max where it was (and masked -inf scores at -inf), and only when no softcap, ALiBi bias or additive
    mask is applied to the scaled scores first."""
    return qk_scale > 0 and softcap <= 0 and not alibi and mask_kind != MASK_ADDITIVE


def pow2_block(requested: int, size: int) -> int:
    """The requested block, shrunk to the problem (tiny shapes under the interpreter), never below tl.dot's 16."""
    return max(16, min(requested, triton.next_power_of_2(max(size, 1))))


def attention_forward_triton(
    inputs: AttnInputs,
    flags: AttnFlags,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out_order: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """(output [B, Hq, Nq, Dv] in q's dtype, log-sum-exp [B, Hq, Nq] fp32) of reference.attention_forward.

    Tile knobs left as None come from `default_config(head_dim, has_mask, has_rope)`. The kernel writes the output
    through its strides, laid out in `out_order` (codegen/layouts.py; None: contiguous): [0, 2, 1, 3] writes
    [B, Nq, Hq, Dv] memory, which an output projection then reads without a transpose copy.
    """
    check_tensors(inputs)
    check_extras(inputs, flags)
    rope = rope_args(inputs, flags)
    rng, drop_p, drop_scale = dropout_args(inputs, flags)
    defaults = default_config(
        max(inputs.q.shape[-1], inputs.v.shape[-1]), inputs.mask is not None, rope.cos is not None, rng is not None
    )
    block_m = defaults[0] if block_m is None else block_m
    block_n = defaults[1] if block_n is None else block_n
    num_warps = defaults[2] if num_warps is None else num_warps
    num_stages = defaults[3] if num_stages is None else num_stages
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, q_heads, q_len, head_dim = q.shape
    kv_len, head_dim_v = k.shape[2], v.shape[3]
    blocks = BlockSizes(
        pow2_block(block_m, q_len),
        pow2_block(block_n, kv_len),
        pow2_block(MAX_HEAD_DIM, head_dim),
        pow2_block(MAX_HEAD_DIM, head_dim_v),
    )
    out = empty_in_order((batch, q_heads, q_len, head_dim_v), out_order, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    mask, mask_strides = broadcast_strides(inputs.mask, (batch, q_heads, q_len, kv_len))
    slopes, slope_strides = broadcast_strides(inputs.alibi_slopes, (batch, q_heads))
    mask_kind = MASK_NONE if mask is None else MASK_BOOL if mask.dtype == torch.uint8 else MASK_ADDITIVE
    softcap = flags.softcap
    qk_scale = flags.scale / softcap if softcap > 0 else flags.scale * LOG2E
    tiles = None if inputs.mask is None else mask_block_list(inputs.mask, q_len, kv_len, blocks.m, blocks.n, flags)
    grid = (triton.cdiv(q_len, blocks.m), batch * q_heads)
    emit.launch(
        attention_fwd_kernel, grid, q, k, v, out, lse, mask, slopes, rope.cos, rope.sin, rng,
        None if tiles is None else tiles.block_index, None if tiles is None else tiles.block_count,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides, *slope_strides,
        *rope.cos_strides, *rope.sin_strides, *(tiles.strides() if tiles is not None else (0,) * 6),
        q_heads, q_heads // k.shape[1], q_len, kv_len, head_dim, head_dim_v, rope.rotary_dim,
        qk_scale, softcap * LOG2E, flags.window, kv_len - q_len if flags.bottom_right else 0, drop_p, drop_scale,
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, BLOCK_DV=blocks.dv,
        CAUSAL=flags.causal, USE_WINDOW=flags.window > 0, MASK_KIND=mask_kind,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=slopes is not None,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=q.dtype == torch.bfloat16 and interpreting(),
        ROPE_LAYOUT=rope.layout, HAS_DROPOUT=rng is not None, SKIP_TILES=tiles is not None,
        SCALE_IN_EXP=scale_in_exp(qk_scale, softcap, slopes is not None, mask_kind),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, lse
