"""FlashAttention-2 style Triton forward kernel for reference.attention_forward, and its launcher.

One program computes BLOCK_M query rows of one (batch, q_head) with an fp32 online softmax over key blocks and
returns the output plus the natural-log log-sum-exp ([B, Hq, Nq], fp32) that the backward pass recomputes from.
RoPE (reference.rope_qk) is applied to the Q tile and to each K tile as they are loaded, in fp32, rounded back to
q's dtype; cos/sin rows are each tensor's own sequence positions.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import ROPE_INTERLEAVED, ROPE_NONE, ROPE_ROTATE_HALF, AttnFlags, AttnInputs

LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@triton.jit
def _tanh(x):  # type: ignore[no-untyped-def]
    # tl has no tanh on every backend; 1 - 2/(e^2x + 1) saturates to ±1 without producing NaN at ±inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):  # type: ignore[no-untyped-def]
    # The CPU interpreter multiplies bf16 tiles as raw integers (triton 3.9); exact fp32 products are the same math.
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def _rope_tile(  # type: ignore[no-untyped-def]
    x, X, Cos, Sin, offs_row, offs_col, row_ok, col_ok, stride_row, stride_col, stride_crow, stride_ccol,
    stride_srow, stride_scol, rotary_dim, ROPE_LAYOUT: tl.constexpr,
):  # fmt: skip
    """x (a loaded tile of X, rows by sequence position, columns by feature) with RoPE on its first rotary_dim
    features, in x's dtype: x·cos + sign·x[partner]·sin in fp32, where R(x)[d] = sign·x[partner(d)].

    Row/column offsets may be laid out either way round (the K tile is transposed); cos/sin rows are the tile's
    sequence positions. X/Cos/Sin already point at the tile's (batch, head).
    """
    in_rot = col_ok & (offs_col < rotary_dim)
    if ROPE_LAYOUT == 0:  # rotate-half: R(x) = cat(-x[r/2:r], x[:r/2])
        half = rotary_dim // 2
        first = offs_col < half
        partner = tl.where(first, offs_col + half, offs_col - half)
        sign = tl.where(first, -1.0, 1.0)
    else:  # interleaved: R(x)[2i] = -x[2i+1], R(x)[2i+1] = x[2i]
        partner = offs_col ^ 1
        sign = tl.where((offs_col % 2) == 0, -1.0, 1.0)
    ok = row_ok & in_rot
    xp = tl.load(X + offs_row * stride_row + partner * stride_col, mask=ok, other=0.0).to(tl.float32)
    cos = tl.load(Cos + offs_row * stride_crow + offs_col * stride_ccol, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(Sin + offs_row * stride_srow + offs_col * stride_scol, mask=ok, other=0.0).to(tl.float32)
    rotated = x.to(tl.float32) * cos + sign * xp * sin
    return tl.where(in_rot, rotated, x.to(tl.float32)).to(x.dtype)


@triton.jit
def attention_fwd_kernel(  # type: ignore[no-untyped-def]
    Q, K, V, Out, Lse, Mask, Alibi, Cos, Sin,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_cb, stride_ch, stride_cn, stride_cd,
    stride_sb, stride_sh, stride_sn, stride_sd,
    num_q_heads, group, q_len, kv_len, head_dim, head_dim_v, rotary_dim,
    qk_scale, softcap_log2, window, pos_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROPE_LAYOUT: tl.constexpr,
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
        q = _rope_tile(
            q, q_base, Cos + off_b * stride_cb + off_h * stride_ch, Sin + off_b * stride_sb + off_h * stride_sh,
            offs_m[:, None], offs_d[None, :], offs_m[:, None] < q_len, offs_d[None, :] < head_dim,
            stride_qm, stride_qd, stride_cn, stride_cd, stride_sn, stride_sd, rotary_dim, ROPE_LAYOUT,
        )  # fmt: skip
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * 1.4426950408889634

    # Key-block range of this query block: blocks entirely outside causal/window are never loaded.
    lo = 0
    hi = kv_len
    last_pos = tl.minimum(start_m * BLOCK_M + BLOCK_M, q_len) - 1 + pos_offset
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
    if USE_WINDOW:
        first_pos = start_m * BLOCK_M + pos_offset
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=(offs_n[None, :] < kv_len) & (offs_d[:, None] < head_dim),
            other=0.0,
        )
        if ROPE_LAYOUT >= 0:  # same table, rows by key position; a nonzero cos/sin head stride implies group == 1
            kt = _rope_tile(
                kt, k_base,
                Cos + off_b * stride_cb + off_kvh * stride_ch, Sin + off_b * stride_sb + off_kvh * stride_sh,
                offs_n[None, :], offs_d[:, None], offs_n[None, :] < kv_len, offs_d[:, None] < head_dim,
                stride_kn, stride_kd, stride_cn, stride_cd, stride_sn, stride_sd, rotary_dim, ROPE_LAYOUT,
            )  # fmt: skip
        # Scores live in log2 units: log2(e) is folded into qk_scale (or into softcap_log2 with softcap).
        s = _dot(q, kt, INPUT_PRECISION, UPCAST_DOT)
        s = _tanh(s * qk_scale) * softcap_log2 if HAS_SOFTCAP else s * qk_scale
        if HAS_ALIBI:
            s += slope * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
        keep = offs_n[None, :] < kv_len
        if CAUSAL:
            keep &= offs_n[None, :] <= q_pos[:, None]
        if USE_WINDOW:
            keep &= (q_pos[:, None] - offs_n[None, :]) < window
        if MASK_KIND != 0:
            mask_ptrs = (
                Mask + off_b * stride_mb + off_h * stride_mh + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
            )
            in_range = (offs_m[:, None] < q_len) & (offs_n[None, :] < kv_len)
            if MASK_KIND == 1:
                keep &= tl.load(mask_ptrs, mask=in_range, other=0) != 0
            else:
                s += tl.load(mask_ptrs, mask=in_range, other=0.0).to(tl.float32) * 1.4426950408889634
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no kept key so far has m_new = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=(offs_n[:, None] < kv_len) & (offs_dv[None, :] < head_dim_v),
            other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST_DOT)
        m_i = m_new

    # Fully masked rows: l = 0, acc = 0 -> output 0 and lse = -inf.
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        acc.to(Out.dtype.element_ty),
        mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < head_dim_v),
    )
    tl.store(Lse + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


# -------------------------------------------------------------------------------------------------- launcher
class _Blocks(NamedTuple):
    m: int
    n: int
    d: int
    dv: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(head_dim: int, has_mask: bool = False, has_rope: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) used when the caller gives none.

    Chosen so that the sm_90 build does not spill (`tilefuse compile-check` reports it; tests assert it): at
    D=128 a 64x64 tile with 4 warps needs more than 255 registers per thread, 128x32 with 8 warps does not; a
    mask tile, and RoPE's partner tiles and cos/sin, cost enough registers to need smaller tiles. The autotuner
    replaces these per shape.
    """
    if has_rope:
        if head_dim <= 64:
            return (64, 32, 8, 2) if has_mask else (64, 64, 8, 2)
        return (64, 16, 8, 2) if head_dim <= 128 else (32, 16, 8, 2)
    if head_dim <= 64:
        return (128, 32, 8, 2) if has_mask else (128, 64, 8, 2)
    if head_dim <= 128:
        return (64, 32, 8, 2) if has_mask else (128, 32, 8, 2)
    return 64, 16, 8, 2


def _pow2_block(requested: int, size: int) -> int:
    """The requested block, shrunk to the problem (tiny shapes under the interpreter), never below tl.dot's 16."""
    return max(16, min(requested, triton.next_power_of_2(max(size, 1))))


def _check_tensors(inputs: AttnInputs) -> None:
    q, k, v = inputs.q, inputs.k, inputs.v
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
        if t.device != q.device:
            raise ValueError(f"devices differ: q on {q.device}, {name} on {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims {q.shape[-1]}/{v.shape[-1]} exceed the supported {MAX_HEAD_DIM}")


def _rope_active(inputs: AttnInputs, flags: AttnFlags) -> bool:
    """Whether reference.rope_qk rotates q/k: both cos and sin given and a layout other than ROPE_NONE."""
    return inputs.cos is not None and inputs.sin is not None and flags.rope_layout != ROPE_NONE


def _check_rope(inputs: AttnInputs, flags: AttnFlags) -> None:
    q, k, cos, sin = inputs.q, inputs.k, inputs.cos, inputs.sin
    if (cos is None) != (sin is None):
        raise ValueError("RoPE needs both cos and sin; got only one of them")
    if not _rope_active(inputs, flags):
        return
    assert cos is not None and sin is not None
    layout, rotary_dim = flags.rope_layout, flags.rotary_dim
    if layout not in (ROPE_ROTATE_HALF, ROPE_INTERLEAVED):
        raise ValueError(f"RoPE layout must be {ROPE_ROTATE_HALF}, {ROPE_INTERLEAVED} or {ROPE_NONE}, got {layout}")
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > q.shape[-1]:
        raise ValueError(f"RoPE rotary_dim must be even and in (0, head_dim={q.shape[-1]}], got {rotary_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"devices differ: q on {q.device}, {name} on {t.device}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"RoPE {name} dtype {t.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
        if torch.result_type(q, t) != q.dtype:
            # reference.rope_forward would promote the rotated q/k (and so QKᵀ) to that dtype; the kernel rounds the
            # rotated tiles to q's dtype, so it only takes tables that do not widen q.
            raise ValueError(f"RoPE {name} dtype {t.dtype} would promote q/k ({q.dtype}); cast it to q's dtype")
        if not 1 <= t.dim() <= 4 or t.shape[-1] != rotary_dim:
            raise ValueError(f"RoPE {name} shape {tuple(t.shape)} must be [..., rotary_dim={rotary_dim}], at most 4-D")
        for who, x in (("q", q), ("k", k)):
            try:
                t.expand(*x.shape[:-1], rotary_dim)
            except RuntimeError as err:
                raise ValueError(
                    f"RoPE {name} shape {tuple(t.shape)} does not broadcast to {who}'s [B, H, N, rotary_dim] "
                    f"{(*x.shape[:-1], rotary_dim)}"
                ) from err


def _check_extras(inputs: AttnInputs, flags: AttnFlags) -> None:
    q = inputs.q
    _check_rope(inputs, flags)
    for name, t in (("mask", inputs.mask), ("alibi_slopes", inputs.alibi_slopes)):
        if t is not None and t.device != q.device:
            raise ValueError(f"devices differ: q on {q.device}, {name} on {t.device}")
    mask = inputs.mask
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"mask dtype must be bool or floating, got {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], inputs.k.shape[2]))
        except RuntimeError as err:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to [B, Hq, Nq, Nk]") from err
    slopes = inputs.alibi_slopes
    if slopes is not None and tuple(slopes.shape) not in ((q.shape[1],), (q.shape[0], q.shape[1])):
        raise ValueError(f"alibi_slopes shape {tuple(slopes.shape)} must be [Hq] or [B, Hq]")
    if flags.window < 0 or flags.softcap < 0:
        raise ValueError(f"window ({flags.window}) and softcap ({flags.softcap}) must be >= 0")


def _broadcast_strides(t: Tensor | None, shape: tuple[int, ...]) -> tuple[Tensor | None, tuple[int, ...]]:
    """t expanded (stride 0 on broadcast dims, no copy) to `shape`, and its strides; zeros when t is None."""
    if t is None:
        return None, (0,) * len(shape)
    t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape)).expand(shape)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)  # same bytes, a pointer type every backend loads
    return t, tuple(t.stride())


def attention_forward_triton(
    inputs: AttnInputs,
    flags: AttnFlags,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(output [B, Hq, Nq, Dv] in q's dtype, log-sum-exp [B, Hq, Nq] fp32) of reference.attention_forward.

    Tile knobs left as None come from `default_config(head_dim, has_mask, has_rope)`.
    """
    _check_tensors(inputs)
    _check_extras(inputs, flags)
    has_rope = inputs.cos is not None and inputs.sin is not None and flags.rope_layout != -1
    defaults = default_config(max(inputs.q.shape[-1], inputs.v.shape[-1]), inputs.mask is not None, has_rope)
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
    blocks = _Blocks(
        _pow2_block(block_m, q_len),
        _pow2_block(block_n, kv_len),
        _pow2_block(MAX_HEAD_DIM, head_dim),
        _pow2_block(MAX_HEAD_DIM, head_dim_v),
    )
    out = torch.empty((batch, q_heads, q_len, head_dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    mask, mask_strides = _broadcast_strides(inputs.mask, (batch, q_heads, q_len, kv_len))
    slopes, slope_strides = _broadcast_strides(inputs.alibi_slopes, (batch, q_heads))
    rope = _rope_active(inputs, flags)
    # Strides of cos/sin expanded to q's [B, Hq, Nq, r]; _check_rope made sure they expand to k's too, which gives
    # the same strides (a non-broadcast head or row dim has equal sizes for q and k).
    cos, cos_strides = _broadcast_strides(inputs.cos if rope else None, (batch, q_heads, q_len, flags.rotary_dim))
    sin, sin_strides = _broadcast_strides(inputs.sin if rope else None, (batch, q_heads, q_len, flags.rotary_dim))
    mask_kind = MASK_NONE if mask is None else MASK_BOOL if mask.dtype == torch.uint8 else MASK_ADDITIVE
    softcap = flags.softcap
    qk_scale = flags.scale / softcap if softcap > 0 else flags.scale * LOG2E
    grid = (triton.cdiv(q_len, blocks.m), batch * q_heads)
    attention_fwd_kernel[grid](
        q, k, v, out, lse, mask, slopes, cos, sin,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides, *slope_strides, *cos_strides, *sin_strides,
        q_heads, q_heads // k.shape[1], q_len, kv_len, head_dim, head_dim_v, flags.rotary_dim if rope else 0,
        qk_scale, softcap * LOG2E, flags.window, kv_len - q_len if flags.bottom_right else 0,
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, BLOCK_DV=blocks.dv,
        CAUSAL=flags.causal, USE_WINDOW=flags.window > 0, MASK_KIND=mask_kind,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=slopes is not None,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=q.dtype == torch.bfloat16 and _interpreting(),
        ROPE_LAYOUT=flags.rope_layout if rope else ROPE_NONE,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, lse
