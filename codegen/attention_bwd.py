"""FlashAttention-2 style Triton backward kernels for reference.attention_backward, and their launcher.

delta = rowsum(dO ∘ O) first; then one program per (batch, kv head, key block) accumulates dK/dV over the query
blocks of every q head in its GQA group (no atomics), and one program per (batch, q head, query block) computes dQ.
Both recompute P from q, k and the forward's log-sum-exp. With a mask tensor both skip the tiles it keeps no pair of
(`attention_args.mask_block_list`: dQ takes the forward's per-query-block list, dK/dV the transposed one).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import emit
from .attention_args import (
    MAX_HEAD_DIM,
    BwdConfig,
    backward_configs,
    block_list_args,
    broadcast_strides,
    check_backward_tensors,
    check_extras,
    check_tensors,
    dropout_args,
    mask_block_list,
    rope_args,
    rope_swap_span,
)
from .attention_args import (
    backward_config as backward_config,
)
from .attention_fwd import LOG2E, MASK_ADDITIVE, MASK_BOOL, MASK_NONE, BlockSizes, interpreting, pow2_block
from .attention_tiles import (
    dropout_keep_tile,
    dropout_rows,
    listed_blocks,
    load_kt,
    load_row_stats,
    nth_block,
    recompute_scores,
    rope_grad_tile,
    rope_tile,
    tile_dot,
    unmasked_key_blocks,
    unmasked_query_blocks,
)
from .reference import AttnFlags, AttnInputs


@triton.jit
def attention_bwd_preprocess_kernel(  # type: ignore[no-untyped-def]
    Out, DO, Delta, GradLse,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    num_q_heads, q_len, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_q_heads).to(tl.int64)
    off_h = (pid_bh % num_q_heads).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_range = (offs_m[:, None] < q_len) & (offs_dv[None, :] < head_dim_v)
    o = tl.load(
        Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        mask=in_range,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
        mask=in_range,
        other=0.0,
    ).to(tl.float32)
    delta = tl.sum(o * do, 1)
    rows = pid_bh.to(tl.int64) * q_len + offs_m
    if HAS_GRAD_LSE:  # d lse / dS = P: the row term of dS = P ∘ (dP - delta) takes -dlse
        delta -= tl.load(GradLse + rows, mask=offs_m < q_len, other=0.0)
    tl.store(Delta + rows, delta, mask=offs_m < q_len)


@triton.jit
def attention_bwd_dkdv_kernel(  # type: ignore[no-untyped-def]
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, Alibi, Cos, Sin, Rng,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_cb, stride_ch, stride_cn, stride_cd,
    stride_sb, stride_sh, stride_sn, stride_sd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_q_heads, group, q_len, kv_len, head_dim, head_dim_v, rotary_dim,
    sm_scale, qk_scale, softcap_log2, window, pos_offset, drop_p, drop_scale,
    BlockIdx, BlockCount, stride_ib, stride_ih, stride_im, stride_nb, stride_nh, stride_nm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROPE_LAYOUT: tl.constexpr, SWAP_SPAN: tl.constexpr, HAS_DROPOUT: tl.constexpr, SKIP_TILES: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N
    pid_bkv = tl.program_id(1)
    num_kv_heads = num_q_heads // group
    off_b = (pid_bkv // num_kv_heads).to(tl.int64)
    off_kvh = (pid_bkv % num_kv_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    # RoPE: gradients are taken w.r.t. the rotated q/k (as the forward multiplies them) and mapped back through
    # RoPEᵀ in the epilogue.
    cos_off = off_b * stride_cb + off_kvh * stride_ch
    sin_off = off_b * stride_sb + off_kvh * stride_sh
    kv_end = kv_len  # keys whose K/V rows (and RoPE tables) are loaded
    if SKIP_TILES:
        # When no q head of the group lists a query block for this key block, load nothing: dK and dV are zero.
        listed_at = BlockCount + off_b * stride_nb + off_kvh * group * stride_nh + tl.program_id(0) * stride_nm + 1
        listed = tl.load(listed_at)
        for g in range(1, group):
            listed += tl.load(listed_at + g * stride_nh)
        kv_end = tl.where(listed > 0, kv_len, 0)
    kt = load_kt(
        k_base, Cos, Sin, cos_off, sin_off, offs_n, offs_d, kv_end, head_dim,
        stride_kn, stride_kd, stride_cn, stride_cd, stride_sn, stride_sd, rotary_dim, ROPE_LAYOUT,
    )  # fmt: skip
    vt_ptrs = V + off_b * stride_vb + off_kvh * stride_vh + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd
    vt = tl.load(vt_ptrs, mask=(offs_n[None, :] < kv_end) & (offs_dv[:, None] < head_dim_v), other=0.0)

    # Query-block range of this key block: queries before it (causal) or past its window never see it.
    lo = 0
    hi = q_len
    if CAUSAL:
        lo = tl.maximum(start_n - pos_offset, 0) // BLOCK_M * BLOCK_M
    if USE_WINDOW:
        hi = tl.minimum(hi, tl.minimum(start_n + BLOCK_N, kv_len) - 1 + window - pos_offset)

    num_blocks = tl.maximum(tl.cdiv(hi - lo, BLOCK_M), 0)
    i_lo, i_hi = unmasked_query_blocks(
        lo, num_blocks, start_n, q_len, kv_len, window, pos_offset, BLOCK_M, BLOCK_N, CAUSAL, USE_WINDOW
    )  # query blocks lo / BLOCK_M + [i_lo, i_hi) run unmasked, the others masked
    blk_lo = lo // BLOCK_M
    c_lo = blk_lo + i_lo
    c_hi = blk_lo + i_hi

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, group):
        off_h = off_kvh * group + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_gb + off_h * stride_gh
        mask_off = off_b * stride_mb + off_h * stride_mh  # None-safe: Mask is only offset under MASK_KIND
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * 1.4426950408889634
        idx_base = BlockIdx  # None-safe: only offset (and read) under SKIP_TILES
        if SKIP_TILES:
            # This q head's list for the key block: full query blocks [0, p_hi) (all rows real) run clean.
            idx_base, p_hi, n_masked = listed_blocks(
                BlockIdx, BlockCount, off_b, off_h, tl.program_id(0), stride_ib, stride_ih, stride_im, stride_nb,
                stride_nh, stride_nm,
            )  # fmt: skip
            p_lo = 0
        else:
            p_lo, p_hi, n_masked = c_lo, c_hi, i_lo + num_blocks - i_hi  # phase 0 walks query blocks [p_lo, p_hi)
        # Unrolled at compile time: phase 0 = query blocks needing no mask (absent under a data mask without a
        # list), 1 = the rest.
        for phase in tl.static_range(0 if MASK_KIND == 0 or SKIP_TILES else 1, 2):
            for block in range(0, p_hi - p_lo if phase == 0 else n_masked):
                offs_m = nth_block(block, blk_lo, p_lo, p_hi, idx_base, phase, SKIP_TILES) * BLOCK_M + offs_m0
                q = tl.load(
                    q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim),
                    other=0.0,
                )
                if ROPE_LAYOUT >= 0:
                    q = rope_tile(
                        q, q_base, Cos + off_b * stride_cb + off_h * stride_ch,
                        Sin + off_b * stride_sb + off_h * stride_sh, offs_m[:, None], offs_d[None, :],
                        offs_m[:, None] < q_len, offs_d[None, :] < head_dim, stride_qm, stride_qd, stride_cn,
                        stride_cd, stride_sn, stride_sd, rotary_dim, ROPE_LAYOUT,
                    )  # fmt: skip
                do = tl.load(
                    do_base + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                    mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < head_dim_v),
                    other=0.0,
                )
                lse, delta = load_row_stats(Lse, Delta, off_b * num_q_heads + off_h, offs_m, q_len)
                s, t = recompute_scores(
                    q, kt, offs_m, offs_n, Mask, mask_off, stride_mm, stride_mn, slope,
                    q_len, kv_len, qk_scale, softcap_log2, window, pos_offset,
                    CAUSAL, USE_WINDOW, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, INPUT_PRECISION, UPCAST_DOT, phase == 1,
                )  # fmt: skip
                p = tl.exp2(s - lse[:, None])
                dp = tile_dot(do, vt, INPUT_PRECISION, UPCAST_DOT)
                p_dropped = p
                if HAS_DROPOUT:  # dV takes the dropped P; dP gets the same mask and scale (delta needs none)
                    seed, row_counter = dropout_rows(Rng, (off_b * num_q_heads + off_h) * q_len + offs_m, kv_len)
                    keep = dropout_keep_tile(seed, row_counter, offs_n, drop_p)
                    p_dropped = tl.where(keep, p * drop_scale, 0.0)
                    dp = tl.where(keep, dp * drop_scale, 0.0)
                dv += tile_dot(tl.trans(p_dropped.to(do.dtype)), do, INPUT_PRECISION, UPCAST_DOT)
                ds = p * (dp - delta[:, None])
                if HAS_SOFTCAP:
                    ds = ds * (1.0 - t * t)
                dk += tile_dot(tl.trans(ds.to(q.dtype)), q, INPUT_PRECISION, UPCAST_DOT)

    dk_ptrs = (
        DK + off_b * stride_dkb + off_kvh * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    )
    dk_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < head_dim)
    dk *= sm_scale
    if ROPE_LAYOUT >= 0:
        dk = rope_grad_tile(
            dk, Cos + cos_off, Sin + sin_off, offs_n[:, None], offs_d[None, :], offs_n[:, None] < kv_end,
            offs_d[None, :] < head_dim, stride_cn, stride_cd, stride_sn, stride_sd, rotary_dim,
            ROPE_LAYOUT, BLOCK_N, BLOCK_D, SWAP_SPAN,
        )  # fmt: skip
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)
    dv_ptrs = (
        DV + off_b * stride_dvb + off_kvh * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    )
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < kv_len) & (offs_dv[None, :] < head_dim_v))


@triton.jit
def attention_bwd_dq_kernel(  # type: ignore[no-untyped-def]
    Q, K, V, DO, Lse, Delta, DQ, Mask, Alibi, Cos, Sin, Rng,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_cb, stride_ch, stride_cn, stride_cd,
    stride_sb, stride_sh, stride_sn, stride_sd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_q_heads, group, q_len, kv_len, head_dim, head_dim_v, rotary_dim,
    sm_scale, qk_scale, softcap_log2, window, pos_offset, drop_p, drop_scale,
    BlockIdx, BlockCount, stride_ib, stride_ih, stride_im, stride_nb, stride_nh, stride_nm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROPE_LAYOUT: tl.constexpr, SWAP_SPAN: tl.constexpr, HAS_DROPOUT: tl.constexpr, SKIP_TILES: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_q_heads).to(tl.int64)
    off_h = (pid_bh % num_q_heads).to(tl.int64)
    off_kvh = off_h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    mask_off = off_b * stride_mb + off_h * stride_mh  # None-safe: Mask is only offset under MASK_KIND
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim),
        other=0.0,
    )
    cos_off = off_b * stride_cb + off_h * stride_ch  # None-safe offsets: Cos/Sin are only offset under RoPE
    sin_off = off_b * stride_sb + off_h * stride_sh
    if ROPE_LAYOUT >= 0:
        q = rope_tile(
            q, q_base, Cos + cos_off, Sin + sin_off, offs_m[:, None], offs_d[None, :], offs_m[:, None] < q_len,
            offs_d[None, :] < head_dim, stride_qm, stride_qd, stride_cn, stride_cd, stride_sn, stride_sd,
            rotary_dim, ROPE_LAYOUT,
        )  # fmt: skip
    do_ptrs = DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd
    do = tl.load(do_ptrs, mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < head_dim_v), other=0.0)
    lse, delta = load_row_stats(Lse, Delta, pid_bh.to(tl.int64), offs_m, q_len)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * 1.4426950408889634
    if HAS_DROPOUT:
        seed, row_counter = dropout_rows(Rng, pid_bh.to(tl.int64) * q_len + offs_m, kv_len)

    # Same key-block range as the forward.
    lo = 0
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, tl.minimum(start_m + BLOCK_M, q_len) + pos_offset)
    if USE_WINDOW:
        lo = tl.maximum(start_m + pos_offset - window + 1, 0) // BLOCK_N * BLOCK_N
    blk_lo = lo // BLOCK_N
    blk_hi = blk_lo + tl.cdiv(hi - lo, BLOCK_N)
    idx_base = BlockIdx  # None-safe: only offset (and read) under SKIP_TILES
    if SKIP_TILES:
        # The forward's list at this kernel's blocks: full key blocks [0, c_hi) run clean (rows past q_len may
        # see anything there: their dQ is not stored).
        idx_base, c_hi, n_masked = listed_blocks(
            BlockIdx, BlockCount, off_b, off_h, tl.program_id(0), stride_ib, stride_ih, stride_im, stride_nb,
            stride_nh, stride_nm,
        )  # fmt: skip
        c_lo = 0
    else:
        c_lo = blk_lo
        c_hi = blk_lo
        if MASK_KIND == 0:  # unmasked key blocks, as in the forward, when every row is a real query
            c_lo, c_hi = unmasked_key_blocks(
                blk_lo, blk_hi, start_m + pos_offset, start_m + BLOCK_M - 1 + pos_offset, kv_len, window,
                BLOCK_N, CAUSAL, USE_WINDOW,
            )  # fmt: skip
            c_hi = tl.where(start_m + BLOCK_M <= q_len, c_hi, c_lo)
        n_masked = (c_lo - blk_lo) + (blk_hi - c_hi)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_cos_off = off_b * stride_cb + off_kvh * stride_ch
    kv_sin_off = off_b * stride_sb + off_kvh * stride_sh
    # Unrolled at compile time: phase 0 = key blocks needing no mask (absent under a data mask without a list),
    # 1 = the rest.
    for phase in tl.static_range(0 if MASK_KIND == 0 or SKIP_TILES else 1, 2):
        for block in range(0, c_hi - c_lo if phase == 0 else n_masked):
            offs_n = nth_block(block, blk_lo, c_lo, c_hi, idx_base, phase, SKIP_TILES) * BLOCK_N + offs_n0
            kt = load_kt(
                k_base, Cos, Sin, kv_cos_off, kv_sin_off, offs_n, offs_d, kv_len, head_dim,
                stride_kn, stride_kd, stride_cn, stride_cd, stride_sn, stride_sd, rotary_dim, ROPE_LAYOUT,
            )  # fmt: skip
            vt = tl.load(
                v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                mask=(offs_n[None, :] < kv_len) & (offs_dv[:, None] < head_dim_v),
                other=0.0,
            )
            s, t = recompute_scores(
                q, kt, offs_m, offs_n, Mask, mask_off, stride_mm, stride_mn, slope,
                q_len, kv_len, qk_scale, softcap_log2, window, pos_offset,
                CAUSAL, USE_WINDOW, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, INPUT_PRECISION, UPCAST_DOT, phase == 1,
            )  # fmt: skip
            p = tl.exp2(s - lse[:, None])
            dp = tile_dot(do, vt, INPUT_PRECISION, UPCAST_DOT)
            if HAS_DROPOUT:
                dp = tl.where(dropout_keep_tile(seed, row_counter, offs_n, drop_p), dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq += tile_dot(ds.to(q.dtype), tl.trans(kt), INPUT_PRECISION, UPCAST_DOT)

    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    dq_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim)
    dq *= sm_scale
    if ROPE_LAYOUT >= 0:
        dq = rope_grad_tile(
            dq, Cos + cos_off, Sin + sin_off, offs_m[:, None], offs_d[None, :], offs_m[:, None] < q_len,
            offs_d[None, :] < head_dim, stride_cn, stride_cd, stride_sn, stride_sd, rotary_dim,
            ROPE_LAYOUT, BLOCK_M, BLOCK_D, SWAP_SPAN,
        )  # fmt: skip
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=dq_mask)


# -------------------------------------------------------------------------------------------------- launcher
def _blocks(config: BwdConfig, q: Tensor, k: Tensor, v: Tensor) -> BlockSizes:
    return BlockSizes(
        pow2_block(config.block_m, q.shape[2]),
        pow2_block(config.block_n, k.shape[2]),
        pow2_block(MAX_HEAD_DIM, q.shape[3]),
        pow2_block(MAX_HEAD_DIM, v.shape[3]),
    )


def _shared_args(grad_out: Tensor, inputs: AttnInputs, flags: AttnFlags) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(pointers, strides and scalars around each kernel's own outputs, constexprs) common to both kernels."""
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    mask, mask_strides = broadcast_strides(inputs.mask, (batch, q_heads, q_len, kv_len))
    slopes, slope_strides = broadcast_strides(inputs.alibi_slopes, (batch, q_heads))
    rope = rope_args(inputs, flags)
    rng, drop_p, drop_scale = dropout_args(inputs, flags)
    softcap = flags.softcap
    args = (
        mask, slopes, rope.cos, rope.sin, rng,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *mask_strides, *slope_strides,
        *rope.cos_strides, *rope.sin_strides,
    )  # fmt: skip
    scalars = (
        q_heads, q_heads // kv_heads, q_len, kv_len, head_dim, head_dim_v, rope.rotary_dim,
        flags.scale, flags.scale / softcap if softcap > 0 else flags.scale * LOG2E, softcap * LOG2E,
        flags.window, kv_len - q_len if flags.bottom_right else 0, drop_p, drop_scale,
    )  # fmt: skip
    meta = dict(
        CAUSAL=flags.causal, USE_WINDOW=flags.window > 0,
        MASK_KIND=MASK_NONE if mask is None else MASK_BOOL if mask.dtype == torch.uint8 else MASK_ADDITIVE,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=slopes is not None,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=q.dtype == torch.bfloat16 and interpreting(),
        ROPE_LAYOUT=rope.layout, SWAP_SPAN=rope_swap_span(rope), HAS_DROPOUT=rng is not None,
        SKIP_TILES=mask is not None,
    )  # fmt: skip
    return (args, scalars), meta


def attention_backward_triton(
    grad_out: Tensor,
    inputs: AttnInputs,
    flags: AttnFlags,
    out: Tensor,
    lse: Tensor,
    grad_lse: Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of reference.attention_backward, from the forward's output and log-sum-exp ([B, Hq, Nq] fp32).

    RoPE and dropout are fused like in the forward (same cos/sin, same rng and dropout_p as the forward call).
    `grad_lse` ([B, Hq, Nq]) is a gradient on lse, folded into delta (see reference.attention_grads).
    Knobs left as None come from `backward_config`; given ones apply to both the dK/dV and the dQ kernel.
    """
    check_tensors(inputs)
    check_extras(inputs, flags)
    check_backward_tensors(grad_out, inputs, out, lse)
    dkdv_config, dq_config = backward_configs(inputs, flags, (block_m, block_n, num_warps, num_stages))
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, q_heads, q_len = q.shape[:3]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if dq.numel() == 0 or dk.numel() == 0 or dv.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    if grad_lse is not None and tuple(grad_lse.shape) != tuple(lse.shape):
        raise ValueError(f"grad_lse must have lse's shape {tuple(lse.shape)}, got {tuple(grad_lse.shape)}")
    dlse = None if grad_lse is None else grad_lse.to(device=lse.device, dtype=torch.float32).contiguous()
    blocks = _blocks(dq_config, q, k, v)
    emit.launch(
        attention_bwd_preprocess_kernel, (triton.cdiv(q_len, blocks.m), batch * q_heads),
        out, grad_out, delta, dlse if dlse is not None else delta, *out.stride(), *grad_out.stride(), q_heads,
        q_len, v.shape[3], BLOCK_M=blocks.m, BLOCK_DV=blocks.dv, HAS_GRAD_LSE=dlse is not None,
    )  # fmt: skip
    (args, scalars), meta = _shared_args(grad_out, inputs, flags)
    kv = _blocks(dkdv_config, q, k, v)
    mask, kv_len = inputs.mask, k.shape[2]
    # Mask block lists: dK/dV visits per key block the query blocks holding a kept pair, dQ the forward's list.
    by_key = None if mask is None else mask_block_list(mask, q_len, kv_len, kv.m, kv.n, flags, by_key=True)
    by_query = None if mask is None else mask_block_list(mask, q_len, kv_len, blocks.m, blocks.n, flags)
    emit.launch(
        attention_bwd_dkdv_kernel, (triton.cdiv(kv_len, kv.n), batch * k.shape[1]),
        q, k, v, grad_out, lse, delta, dk, dv, *args, *dk.stride(), *dv.stride(), *scalars,
        *block_list_args(by_key), **meta, BLOCK_M=kv.m, BLOCK_N=kv.n, BLOCK_D=kv.d, BLOCK_DV=kv.dv,
        num_warps=dkdv_config.num_warps, num_stages=dkdv_config.num_stages,
    )  # fmt: skip
    emit.launch(
        attention_bwd_dq_kernel, (triton.cdiv(q_len, blocks.m), batch * q_heads),
        q, k, v, grad_out, lse, delta, dq, *args, *dq.stride(), *scalars, *block_list_args(by_query), **meta,
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, BLOCK_DV=blocks.dv,
        num_warps=dq_config.num_warps, num_stages=dq_config.num_stages,
    )  # fmt: skip
    return dq, dk, dv
