"""Split-KV (flash-decoding) attention forward for a few query rows over a long KV, and its launcher.

Phase 1 (`attention_decode_split_kernel`, grid (num_splits, B·Hkv)) packs every query row of one GQA group
(group × Nq rows) into the M dimension of one tile, so a kv head's K/V are read once per split, not once per q head,
and streams one chunk of key blocks (with a mask tensor, only those where some row of the group keeps a key) with an
fp32 online softmax into fp32 scratch (normalized partial output and its log2-sum-exp). Phase 2
(`attention_decode_combine_kernel`, one program per query row) merges the splits with log-sum-exp weights.
Semantics are reference.attention_forward's, with the feature set of attention_fwd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import emit
from .attention_args import (
    MAX_HEAD_DIM,
    RopeArgs,
    broadcast_strides,
    check_extras,
    check_tensors,
    dropout_args,
    mask_kept_blocks,
    rope_args,
)
from .attention_fwd import (
    LOG2E,
    MASK_ADDITIVE,
    MASK_BOOL,
    MASK_NONE,
    attention_forward_triton,
    interpreting,
    pow2_block,
)
from .attention_tiles import (
    dropout_keep_tile,
    dropout_rows,
    load_kt,
    online_softmax,
    rope_tile,
    softmax_finish,
    tile_dot,
    tile_tanh,
)
from .layouts import empty_in_order
from .reference import AttnFlags, AttnInputs

NUM_SMS = 132  # H100 SXM: the split heuristic's SM count where no device says otherwise (plans, CPU)
MAX_DECODE_ROWS = 128  # group × Nq rows share one tile; beyond this the FA2 forward tiles better
MAX_SPLITS = 1024
COMBINE_WARPS = 2


def max_decode_rows(head_dim: int) -> int:
    """Most group × Nq rows one phase-1 tile holds without spilling (compile-check, sm_80 and sm_90): the fp32
    accumulator is rows × head_dim, so wide heads get fewer rows."""
    return MAX_DECODE_ROWS if head_dim <= 128 else 32


def use_decode(q_len: int, kv_len: int, group: int, head_dim: int = 128) -> bool:
    """Whether the split-KV kernel should run instead of the FA2 forward.

    With Nq <= 16 the forward has only B·Hq programs, each streaming the whole KV alone: on a short batch most SMs
    idle and latency grows with kv_len. Its BLOCK_M >= 16 also pads a single query row 16x and re-reads K/V once per
    q head of a GQA group. Splitting the KV restores parallelism and packing the group fills the tile. Below ~256
    keys there are too few key blocks to split, and the second launch and scratch round trip cost more than they save.
    """
    return q_len <= 16 and q_len * group <= max_decode_rows(head_dim) and kv_len >= 256


class SplitLayout(NamedTuple):
    """How the visible key range [vis_lo, vis_hi) is cut: split s covers [vis_lo + s·split_len, ... + split_len);
    splits s >= work_splits lie past vis_hi and do no work (no loads, no scratch traffic)."""

    vis_lo: int
    vis_hi: int
    split_len: int
    num_splits: int
    work_splits: int


def default_num_splits(batch_kv_heads: int, visible_blocks: int, num_sms: int = NUM_SMS) -> int:
    """About two programs per SM over the (split, batch·kv head) grid, but never more splits than key blocks."""
    wanted = math.ceil(2 * num_sms / max(batch_kv_heads, 1))
    return max(1, min(wanted, visible_blocks, MAX_SPLITS))


def split_layout(
    q_len: int, kv_len: int, block_n: int, flags: AttnFlags, batch_kv_heads: int, num_splits: int | None = None,
    num_sms: int = NUM_SMS,
) -> SplitLayout:  # fmt: skip
    """The key range every query row of a group may see (causal/window, aligned like the forward kernel), cut into
    block-aligned splits. Shared by the launcher and codegen/plan.py so the plan counts what the kernels do (the
    plan assumes NUM_SMS; the launcher passes its device's SM count, so give num_splits to compare them)."""
    pos_offset = kv_len - q_len if flags.bottom_right else 0
    vis_hi = min(kv_len, q_len + pos_offset) if flags.causal else kv_len
    vis_lo = max(pos_offset - flags.window + 1, 0) // block_n * block_n if flags.window > 0 else 0
    blocks = triton.cdiv(max(vis_hi - vis_lo, 0), block_n)
    splits = default_num_splits(batch_kv_heads, blocks, num_sms) if num_splits is None else num_splits
    split_blocks = max(triton.cdiv(blocks, splits), 1)
    work = triton.cdiv(blocks, split_blocks)
    return SplitLayout(vis_lo, max(vis_hi, vis_lo), split_blocks * block_n, splits, min(work, splits))


def decode_config(block_m: int, head_dim: int, has_rope: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of phase 1 when the caller gives none, chosen with `tilefuse compile-check`
    (every feature on, mask included) so that sm_90 does not spill and shared memory stays under sm_80's 164 KB.
    RoPE holds partner/cos/sin tiles of K in fp32 registers, so it gets narrower key blocks; 32+ rows need 8 warps."""
    if head_dim > 128 or block_m >= 64:
        return (16, 8, 2) if has_rope else (32, 8, 2)
    if has_rope:
        return 32, 4, 3
    return (64, 4, 3) if block_m <= 16 else (64, 8, 3)


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def attention_decode_split_kernel(  # type: ignore[no-untyped-def]
    Q, K, V, Acc, Stat, Mask, Alibi, Cos, Sin, Rng, BlockIdx, BlockPrefix,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_cb, stride_ch, stride_cn, stride_cd,
    stride_sb, stride_sh, stride_sn, stride_sd,
    stride_ib, stride_ih, stride_pb, stride_ph,
    kv_heads, group, q_len, kv_len, head_dim, head_dim_v, rotary_dim,
    qk_scale, softcap_log2, window, pos_offset, drop_p, drop_scale,
    vis_lo, vis_hi, split_len, num_splits, work_splits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROPE_LAYOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SKIP_TILES: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    off_b = (pid_bkv // kv_heads).to(tl.int64)  # int64 so batch/head offsets cannot overflow past 2^31
    off_kvh = (pid_bkv % kv_heads).to(tl.int64)
    rows = group * q_len
    offs_r = tl.arange(0, BLOCK_M)  # packed row r = (q head within the group) · Nq + query row
    off_h = off_kvh * group + (offs_r // q_len).to(tl.int64)
    offs_m = offs_r % q_len
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_pos = offs_m + pos_offset  # query positions in key coordinates (bottom-right alignment shifts them)
    # Splits past the visible range load nothing: their row mask is all false and their key loop is empty.
    # (A scalar where, not `tensor & scalar_bool`: the interpreter rejects the latter's mask dtype.)
    row_ok = offs_r < tl.where(pid_s < work_splits, rows, 0)
    lo = vis_lo + pid_s * split_len
    hi = tl.minimum(lo + split_len, vis_hi)

    q_rows = Q + off_b * stride_qb + off_h * stride_qh + offs_m * stride_qm
    q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
                other=0.0)  # fmt: skip
    if ROPE_LAYOUT >= 0:  # rows are pointers here (packed heads), so rope_tile gets zero row offsets/strides
        cos_rows = Cos + off_b * stride_cb + off_h * stride_ch + offs_m * stride_cn
        sin_rows = Sin + off_b * stride_sb + off_h * stride_sh + offs_m * stride_sn
        q = rope_tile(
            q, q_rows[:, None], cos_rows[:, None], sin_rows[:, None], 0, offs_d[None, :], row_ok[:, None],
            offs_d[None, :] < head_dim, 0, stride_qd, 0, stride_cd, 0, stride_sd, rotary_dim, ROPE_LAYOUT,
        )  # fmt: skip
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b * stride_ab + off_h * stride_ah, mask=row_ok, other=0.0).to(tl.float32)
        slope = slope * 1.4426950408889634
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    slot = (pid_bkv.to(tl.int64) * rows + offs_r) * num_splits + pid_s  # scratch [B, Hq, Nq, splits] row-major
    if HAS_DROPOUT:  # slot // num_splits is the row's (b·Hq + h)·Nq + i, the forward kernel's dropout row
        seed, row_counter = dropout_rows(Rng, slot // num_splits, kv_len)
    if MASK_KIND != 0:  # Mask is None otherwise
        mask_rows = Mask + off_b * stride_mb + off_h * stride_mh + offs_m * stride_mm

    if SKIP_TILES:  # the launcher listed the key blocks some row of the group keeps a key of: visit only those
        # This split's key blocks (lo is block-aligned) are list entries [prefix[lo / BLOCK_N], prefix[⌈hi /
        # BLOCK_N⌉]), walked in steps of BLOCK_N; splits past the visible range load nothing and walk none (a
        # runtime branch: masked scalar loads made sm_90 spill).
        prefix = BlockPrefix + off_b * stride_pb + off_kvh * stride_ph
        first = lo // BLOCK_N
        last = first  # an empty walk unless this split works
        if pid_s < work_splits:
            last = tl.load(prefix + tl.cdiv(hi, BLOCK_N))
            first = tl.load(prefix + first)
        lo = first * BLOCK_N
        hi = last * BLOCK_N
        idx_base = BlockIdx + off_b * stride_ib + off_kvh * stride_ih

    cos_off = off_b * stride_cb + off_kvh * stride_ch
    sin_off = off_b * stride_sb + off_kvh * stride_sh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for pos in range(lo, hi, BLOCK_N):
        start_n = pos
        if SKIP_TILES:
            start_n = tl.load(idx_base + pos // BLOCK_N) * BLOCK_N
        offs_n = start_n + offs_n0
        kt = load_kt(
            k_base, Cos, Sin, cos_off, sin_off, offs_n, offs_d, kv_len, head_dim,
            stride_kn, stride_kd, stride_cn, stride_cd, stride_sn, stride_sd, rotary_dim, ROPE_LAYOUT,
        )  # fmt: skip
        # Scores live in log2 units: log2(e) is folded into qk_scale (or into softcap_log2 with softcap).
        s = tile_dot(q, kt, INPUT_PRECISION, UPCAST_DOT)
        s = tile_tanh(s * qk_scale) * softcap_log2 if HAS_SOFTCAP else s * qk_scale
        if HAS_ALIBI:
            s += slope[:, None] * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
        keep = offs_n[None, :] < kv_len
        if CAUSAL:
            keep &= offs_n[None, :] <= q_pos[:, None]
        if USE_WINDOW:
            keep &= (q_pos[:, None] - offs_n[None, :]) < window
        if MASK_KIND != 0:
            mask_ptrs = mask_rows[:, None] + offs_n[None, :] * stride_mn
            in_range = row_ok[:, None] & (offs_n[None, :] < kv_len)
            if MASK_KIND == 1:
                keep &= tl.load(mask_ptrs, mask=in_range, other=0) != 0
            else:
                s += tl.load(mask_ptrs, mask=in_range, other=0.0).to(tl.float32) * 1.4426950408889634
        s = tl.where(keep, s, float("-inf"))

        p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, 1.0, False)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=(offs_n[:, None] < kv_len) & (offs_dv[None, :] < head_dim_v),
            other=0.0,
        )
        if HAS_DROPOUT:  # on P only: l_i above sums the undropped P, so lse and the split weights are unaffected
            p = tl.where(dropout_keep_tile(seed, row_counter, offs_n, drop_p), p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST_DOT)

    # A row with no kept key in this split: partial 0 with log2-sum-exp -inf, so phase 2 gives it weight 0.
    acc, stat = softmax_finish(acc, m_i, l_i)
    tl.store(Acc + slot[:, None] * head_dim_v + offs_dv[None, :], acc,
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))  # fmt: skip
    tl.store(Stat + slot, stat, mask=row_ok)


@triton.jit
def attention_decode_combine_kernel(  # type: ignore[no-untyped-def]
    Acc, Stat, Out, Lse,
    stride_ob, stride_oh, stride_om, stride_od,
    num_q_heads, q_len, head_dim_v, num_splits, work_splits,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # (b · Hq + h) · Nq + i, the layout of the scratch and of lse
    off_m = row % q_len
    off_h = (row // q_len) % num_q_heads
    off_b = row // q_len // num_q_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    stat = tl.load(Stat + row * num_splits + offs_s, mask=offs_s < work_splits, other=float("-inf"))
    m = tl.max(stat, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp2(stat - m_safe)  # 0 for splits that saw no kept key (and for padding lanes)
    denom = tl.sum(weight, 0)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s in range(0, work_splits):
        w_s = tl.sum(tl.where(offs_s == s, weight, 0.0), 0)
        part = tl.load(Acc + (row * num_splits + s) * head_dim_v + offs_dv, mask=offs_dv < head_dim_v, other=0.0)
        acc += w_s * part
    # Fully masked rows: every weight is 0 -> output 0 and lse = -inf.
    empty = denom == 0.0
    out = acc / tl.where(empty, 1.0, denom)
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(tl.where(empty, 1.0, denom))) * 0.6931471805599453)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + off_m * stride_om + offs_dv * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_dv < head_dim_v)
    tl.store(Lse + row, lse)


# -------------------------------------------------------------------------------------------------- launcher
class _Extras(NamedTuple):
    """Launch arguments of the optional inputs: mask and ALiBi slopes broadcast to [B, Hq, ...] (stride 0 on
    broadcast dims, no copy) with their strides, the mask kind, RoPE's arguments and dropout's."""

    mask: Tensor | None
    slopes: Tensor | None
    strides: tuple[int, ...]  # mask (4), slopes (2), cos (4), sin (4)
    mask_kind: int
    rope: RopeArgs
    rng: Tensor | None
    drop_p: float
    drop_scale: float


def _extras(inputs: AttnInputs, flags: AttnFlags) -> _Extras:
    batch, q_heads, q_len, _ = inputs.q.shape
    mask, mask_strides = broadcast_strides(inputs.mask, (batch, q_heads, q_len, inputs.k.shape[2]))
    slopes, slope_strides = broadcast_strides(inputs.alibi_slopes, (batch, q_heads))
    rope = rope_args(inputs, flags)
    mask_kind = MASK_NONE if mask is None else MASK_BOOL if mask.dtype == torch.uint8 else MASK_ADDITIVE
    strides = (*mask_strides, *slope_strides, *rope.cos_strides, *rope.sin_strides)
    return _Extras(mask, slopes, strides, mask_kind, rope, *dropout_args(inputs, flags))


def _check_knobs(block_n: int | None, num_splits: int | None, rows: int, head_dim: int) -> None:
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    if rows > max_decode_rows(head_dim):
        raise ValueError(
            f"group x q_len = {rows} rows exceed the decode tile ({max_decode_rows(head_dim)} at head dim "
            f"{head_dim}); use attention_forward_triton"
        )


def _launch_split(
    inputs: AttnInputs, flags: AttnFlags, extras: _Extras, layout: SplitLayout, scratch: tuple[Tensor, Tensor],
    blocks: tuple[int, int, int, int], num_warps: int, num_stages: int,
) -> None:  # fmt: skip
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    softcap = flags.softcap
    qk_scale = flags.scale / softcap if softcap > 0 else flags.scale * LOG2E
    block_m, block_n, block_d, block_dv = blocks
    kept = None if inputs.mask is None else mask_kept_blocks(inputs.mask, q_len, kv_len, block_n, q_heads // kv_heads)
    emit.launch(
        attention_decode_split_kernel, (layout.num_splits, batch * kv_heads),
        q, k, v, *scratch, extras.mask, extras.slopes, extras.rope.cos, extras.rope.sin, extras.rng,
        *((None, None) if kept is None else kept[:2]),
        *q.stride(), *k.stride(), *v.stride(), *extras.strides, *((0,) * 4 if kept is None else kept.strides()),
        kv_heads, q_heads // kv_heads, q_len, kv_len, head_dim, head_dim_v, extras.rope.rotary_dim,
        qk_scale, softcap * LOG2E, flags.window, kv_len - q_len if flags.bottom_right else 0, extras.drop_p,
        extras.drop_scale,
        *layout,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        CAUSAL=flags.causal, USE_WINDOW=flags.window > 0, MASK_KIND=extras.mask_kind,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=extras.slopes is not None,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=q.dtype == torch.bfloat16 and interpreting(), ROPE_LAYOUT=extras.rope.layout,
        HAS_DROPOUT=extras.rng is not None, SKIP_TILES=kept is not None, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return NUM_SMS
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def attention_decode_triton(
    inputs: AttnInputs,
    flags: AttnFlags,
    *,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out_order: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """(output [B, Hq, Nq, Dv] in q's dtype, log-sum-exp [B, Hq, Nq] fp32) of reference.attention_forward, by split-KV.

    Knobs left as None come from `decode_config` and `default_num_splits`; num_splits larger than the visible key
    blocks is allowed (the extra splits do no work). The combine kernel writes the output through its strides,
    laid out in `out_order` (codegen/layouts.py; None: contiguous).
    """
    check_tensors(inputs)
    check_extras(inputs, flags)
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, q_heads, q_len, head_dim = q.shape
    kv_len, head_dim_v = k.shape[2], v.shape[3]
    rows = q_heads // k.shape[1] * q_len
    _check_knobs(block_n, num_splits, rows, max(head_dim, head_dim_v))
    extras = _extras(inputs, flags)
    block_m = pow2_block(MAX_DECODE_ROWS, rows)
    defaults = decode_config(block_m, max(head_dim, head_dim_v), extras.rope.cos is not None)
    block_n = pow2_block(defaults[0] if block_n is None else block_n, kv_len)
    blocks = (block_m, block_n, pow2_block(MAX_HEAD_DIM, head_dim), pow2_block(MAX_HEAD_DIM, head_dim_v))
    out = empty_in_order((batch, q_heads, q_len, head_dim_v), out_order, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    layout = split_layout(q_len, kv_len, block_n, flags, batch * k.shape[1], num_splits, _sm_count(q.device))
    acc = torch.empty((batch, q_heads, q_len, layout.num_splits, head_dim_v), dtype=torch.float32, device=q.device)
    stat = torch.empty((batch, q_heads, q_len, layout.num_splits), dtype=torch.float32, device=q.device)
    warps = defaults[1] if num_warps is None else num_warps
    stages = defaults[2] if num_stages is None else num_stages
    _launch_split(inputs, flags, extras, layout, (acc, stat), blocks, warps, stages)
    emit.launch(
        attention_decode_combine_kernel, (batch * q_heads * q_len,),
        acc, stat, out, lse, *out.stride(), q_heads, q_len, head_dim_v, layout.num_splits, layout.work_splits,
        BLOCK_S=triton.next_power_of_2(layout.num_splits), BLOCK_DV=blocks[3], num_warps=COMBINE_WARPS,
    )  # fmt: skip
    return out, lse


def attention_triton(
    inputs: AttnInputs, flags: AttnFlags, *, out_order: Sequence[int] | None = None, **fa2_config: int
) -> tuple[Tensor, Tensor]:
    """(out, lse) of the kernel `use_decode` picks for these shapes: split-KV decode or the FA2 forward (with the
    tile knobs in `fa2_config`), out laid out in `out_order`. Raises ValueError, as both launchers do, for a case
    neither kernel covers."""
    q, k, v = inputs.q, inputs.k, inputs.v
    layout: dict[str, Any] = {} if out_order is None else {"out_order": out_order}  # default: contiguous
    if q.dim() == k.dim() == v.dim() == 4 and k.shape[1] > 0:
        head_dim = max(q.shape[-1], v.shape[-1])
        if use_decode(q.shape[2], k.shape[2], q.shape[1] // k.shape[1], head_dim):
            return attention_decode_triton(inputs, flags, **layout)
    knobs: dict[str, Any] = {**fa2_config, **layout}
    return attention_forward_triton(inputs, flags, **knobs)
