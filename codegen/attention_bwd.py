"""FlashAttention-2 style Triton backward kernels for reference.attention_backward, and their launcher.

delta = rowsum(dO ∘ O) first; then one program per (batch, kv head, key block) accumulates dK/dV over the query
blocks of every q head in its GQA group (no atomics), and one program per (batch, q head, query block) computes dQ.
Both recompute P from q, k and the forward's log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention_fwd import (
    LOG2E,
    MASK_ADDITIVE,
    MASK_BOOL,
    MASK_NONE,
    MAX_HEAD_DIM,
    _Blocks,
    _broadcast_strides,
    _check_extras,
    _check_tensors,
    _dot,
    _interpreting,
    _pow2_block,
    _tanh,
)
from .reference import AttnFlags, AttnInputs


@triton.jit
def attention_bwd_preprocess_kernel(  # type: ignore[no-untyped-def]
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    num_q_heads, q_len, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
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
    tl.store(Delta + pid_bh.to(tl.int64) * q_len + offs_m, tl.sum(o * do, 1), mask=offs_m < q_len)


@triton.jit
def _recompute_scores(  # type: ignore[no-untyped-def]
    q, kt, offs_m, offs_n, Mask, mask_off, stride_mm, stride_mn, slope,
    q_len, kv_len, qk_scale, softcap_log2, window, pos_offset,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """(masked scores in log2 units, tanh of the scaled scores for the softcap chain rule; the scores without it)."""
    s = _dot(q, kt, INPUT_PRECISION, UPCAST_DOT) * qk_scale
    t = s
    if HAS_SOFTCAP:
        t = _tanh(s)
        s = t * softcap_log2
    q_pos = offs_m + pos_offset
    if HAS_ALIBI:
        s += slope * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
    # Padded query rows are dropped too: their lse is loaded as 0, and exp2 of a live score would not vanish.
    in_range = (offs_m[:, None] < q_len) & (offs_n[None, :] < kv_len)
    keep = in_range
    if CAUSAL:
        keep &= offs_n[None, :] <= q_pos[:, None]
    if USE_WINDOW:
        keep &= (q_pos[:, None] - offs_n[None, :]) < window
    if MASK_KIND != 0:
        mask_ptrs = Mask + mask_off + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        if MASK_KIND == 1:
            keep &= tl.load(mask_ptrs, mask=in_range, other=0) != 0
        else:
            s += tl.load(mask_ptrs, mask=in_range, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(keep, s, float("-inf")), t


@triton.jit
def _load_row_stats(Lse, Delta, row, offs_m, q_len):  # type: ignore[no-untyped-def]
    """(lse in log2 units, delta) of BLOCK_M rows; a fully masked row's -inf lse becomes 0: P = exp2(-inf) = 0."""
    lse = tl.load(Lse + row * q_len + offs_m, mask=offs_m < q_len, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    return lse, tl.load(Delta + row * q_len + offs_m, mask=offs_m < q_len, other=0.0)


@triton.jit
def attention_bwd_dkdv_kernel(  # type: ignore[no-untyped-def]
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, Alibi,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_q_heads, group, q_len, kv_len, head_dim, head_dim_v,
    sm_scale, qk_scale, softcap_log2, window, pos_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
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
    kt_ptrs = K + off_b * stride_kb + off_kvh * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < kv_len) & (offs_d[:, None] < head_dim), other=0.0)
    vt_ptrs = V + off_b * stride_vb + off_kvh * stride_vh + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd
    vt = tl.load(vt_ptrs, mask=(offs_n[None, :] < kv_len) & (offs_dv[:, None] < head_dim_v), other=0.0)

    # Query-block range of this key block: queries before it (causal) or past its window never see it.
    lo = 0
    hi = q_len
    if CAUSAL:
        lo = tl.maximum(start_n - pos_offset, 0) // BLOCK_M * BLOCK_M
    if USE_WINDOW:
        hi = tl.minimum(hi, tl.minimum(start_n + BLOCK_N, kv_len) - 1 + window - pos_offset)

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
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            q = tl.load(
                q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim),
                other=0.0,
            )
            do = tl.load(
                do_base + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < head_dim_v),
                other=0.0,
            )
            lse, delta = _load_row_stats(Lse, Delta, off_b * num_q_heads + off_h, offs_m, q_len)
            s, t = _recompute_scores(
                q, kt, offs_m, offs_n, Mask, mask_off, stride_mm, stride_mn, slope,
                q_len, kv_len, qk_scale, softcap_log2, window, pos_offset,
                CAUSAL, USE_WINDOW, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, INPUT_PRECISION, UPCAST_DOT,
            )  # fmt: skip
            p = tl.exp2(s - lse[:, None])
            dv += _dot(tl.trans(p.to(do.dtype)), do, INPUT_PRECISION, UPCAST_DOT)
            ds = p * (_dot(do, vt, INPUT_PRECISION, UPCAST_DOT) - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, INPUT_PRECISION, UPCAST_DOT)

    dk_ptrs = (
        DK + off_b * stride_dkb + off_kvh * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    )
    dk_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < head_dim)
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=dk_mask)
    dv_ptrs = (
        DV + off_b * stride_dvb + off_kvh * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    )
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < kv_len) & (offs_dv[None, :] < head_dim_v))


@triton.jit
def attention_bwd_dq_kernel(  # type: ignore[no-untyped-def]
    Q, K, V, DO, Lse, Delta, DQ, Mask, Alibi,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_q_heads, group, q_len, kv_len, head_dim, head_dim_v,
    sm_scale, qk_scale, softcap_log2, window, pos_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
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
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim), other=0.0)
    do_ptrs = DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd
    do = tl.load(do_ptrs, mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < head_dim_v), other=0.0)
    lse, delta = _load_row_stats(Lse, Delta, pid_bh.to(tl.int64), offs_m, q_len)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * 1.4426950408889634

    # Same key-block range as the forward.
    lo = 0
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, tl.minimum(start_m + BLOCK_M, q_len) + pos_offset)
    if USE_WINDOW:
        lo = tl.maximum(start_m + pos_offset - window + 1, 0) // BLOCK_N * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=(offs_n[None, :] < kv_len) & (offs_d[:, None] < head_dim),
            other=0.0,
        )
        vt = tl.load(
            v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
            mask=(offs_n[None, :] < kv_len) & (offs_dv[:, None] < head_dim_v),
            other=0.0,
        )
        s, t = _recompute_scores(
            q, kt, offs_m, offs_n, Mask, mask_off, stride_mm, stride_mn, slope,
            q_len, kv_len, qk_scale, softcap_log2, window, pos_offset,
            CAUSAL, USE_WINDOW, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, INPUT_PRECISION, UPCAST_DOT,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        ds = p * (_dot(do, vt, INPUT_PRECISION, UPCAST_DOT) - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(q.dtype), tl.trans(kt), INPUT_PRECISION, UPCAST_DOT)

    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    dq_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=dq_mask)


# -------------------------------------------------------------------------------------------------- launcher
def _check_backward_tensors(grad_out: Tensor, inputs: AttnInputs, out: Tensor, lse: Tensor) -> None:
    q, v = inputs.q, inputs.v
    out_shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != out_shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must be [B, Hq, Nq, Dv] = {out_shape}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must match q's {q.dtype}")
    if tuple(lse.shape) != out_shape[:3] or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 [B, Hq, Nq] = {out_shape[:3]}, got {lse.dtype} {tuple(lse.shape)}")
    for name, t in (("grad_out", grad_out), ("out", out), ("lse", lse)):
        if t.device != q.device:
            raise ValueError(f"devices differ: q on {q.device}, {name} on {t.device}")


def _check_launch(block_m: int, block_n: int) -> None:
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def attention_backward_triton(
    grad_out: Tensor,
    inputs: AttnInputs,
    flags: AttnFlags,
    out: Tensor,
    lse: Tensor,
    *,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of reference.attention_backward, from the forward's output and log-sum-exp ([B, Hq, Nq] fp32).

    RoPE is not fused: cos/sin raise ValueError, and the caller applies rope_backward around this call.
    """
    if inputs.cos is not None or inputs.sin is not None:
        raise ValueError("RoPE (cos/sin) is not supported by the Triton backward; fall back to the reference")
    _check_tensors(inputs)
    _check_extras(inputs, flags)
    _check_backward_tensors(grad_out, inputs, out, lse)
    _check_launch(block_m, block_n)
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if dq.numel() == 0 or dk.numel() == 0 or dv.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    blocks = _Blocks(
        _pow2_block(block_m, q_len),
        _pow2_block(block_n, kv_len),
        _pow2_block(MAX_HEAD_DIM, head_dim),
        _pow2_block(MAX_HEAD_DIM, head_dim_v),
    )
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    attention_bwd_preprocess_kernel[(triton.cdiv(q_len, blocks.m), batch * q_heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), q_heads, q_len, head_dim_v,
        BLOCK_M=blocks.m, BLOCK_DV=blocks.dv,
    )  # fmt: skip
    mask, mask_strides = _broadcast_strides(inputs.mask, (batch, q_heads, q_len, kv_len))
    slopes, slope_strides = _broadcast_strides(inputs.alibi_slopes, (batch, q_heads))
    mask_kind = MASK_NONE if mask is None else MASK_BOOL if mask.dtype == torch.uint8 else MASK_ADDITIVE
    softcap = flags.softcap
    common = (
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *mask_strides, *slope_strides,
    )  # fmt: skip
    scalars = (
        q_heads, q_heads // kv_heads, q_len, kv_len, head_dim, head_dim_v,
        flags.scale, flags.scale / softcap if softcap > 0 else flags.scale * LOG2E, softcap * LOG2E,
        flags.window, kv_len - q_len if flags.bottom_right else 0,
    )  # fmt: skip
    meta = dict(
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, BLOCK_DV=blocks.dv,
        CAUSAL=flags.causal, USE_WINDOW=flags.window > 0, MASK_KIND=mask_kind,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=slopes is not None,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=q.dtype == torch.bfloat16 and _interpreting(),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    attention_bwd_dkdv_kernel[(triton.cdiv(kv_len, blocks.n), batch * kv_heads)](
        q, k, v, grad_out, lse, delta, dk, dv, mask, slopes, *common, *dk.stride(), *dv.stride(), *scalars, **meta
    )
    attention_bwd_dq_kernel[(triton.cdiv(q_len, blocks.m), batch * q_heads)](
        q, k, v, grad_out, lse, delta, dq, mask, slopes, *common, *dq.stride(), *scalars, **meta
    )
    return dq, dk, dv
