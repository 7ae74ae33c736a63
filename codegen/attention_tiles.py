"""Triton device helpers shared by the attention forward and backward kernels: dot, tanh, RoPE on loaded tiles,
RoPEᵀ on gradient tiles, and counter-based dropout (codegen.philox / reference.dropout_keep hold the semantics).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_tanh(x):  # type: ignore[no-untyped-def]
    # tl has no tanh on every backend; 1 - 2/(e^2x + 1) saturates to ±1 without producing NaN at ±inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def tile_dot(a, b, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):  # type: ignore[no-untyped-def]
    # The CPU interpreter multiplies bf16 tiles as raw integers (triton 3.9); exact fp32 products are the same math.
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def _rope_partner(offs_col, rotary_dim, ROPE_LAYOUT: tl.constexpr):  # type: ignore[no-untyped-def]
    """(partner column, sign) with R(x)[d] = sign·x[partner(d)] on the first rotary_dim features."""
    if ROPE_LAYOUT == 0:  # rotate-half: R(x) = cat(-x[r/2:r], x[:r/2])
        half = rotary_dim // 2
        first = offs_col < half
        return tl.where(first, offs_col + half, offs_col - half), tl.where(first, -1.0, 1.0)
    # interleaved: R(x)[2i] = -x[2i+1], R(x)[2i+1] = x[2i]
    return offs_col ^ 1, tl.where((offs_col % 2) == 0, -1.0, 1.0)


@triton.jit
def rope_tile(  # type: ignore[no-untyped-def]
    x, X, Cos, Sin, offs_row, offs_col, row_ok, col_ok, stride_row, stride_col, stride_crow, stride_ccol,
    stride_srow, stride_scol, rotary_dim, ROPE_LAYOUT: tl.constexpr,
):  # fmt: skip
    """x (a loaded tile of X, rows by sequence position, columns by feature) with RoPE on its first rotary_dim
    features, in x's dtype: x·cos + sign·x[partner]·sin in fp32, where R(x)[d] = sign·x[partner(d)].

    Row/column offsets may be laid out either way round (the K tile is transposed); cos/sin rows are the tile's
    sequence positions. X/Cos/Sin already point at the tile's (batch, head).
    """
    in_rot = col_ok & (offs_col < rotary_dim)
    partner, sign = _rope_partner(offs_col, rotary_dim, ROPE_LAYOUT)
    ok = row_ok & in_rot
    xp = tl.load(X + offs_row * stride_row + partner * stride_col, mask=ok, other=0.0).to(tl.float32)
    cos = tl.load(Cos + offs_row * stride_crow + offs_col * stride_ccol, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(Sin + offs_row * stride_srow + offs_col * stride_scol, mask=ok, other=0.0).to(tl.float32)
    rotated = x.to(tl.float32) * cos + sign * xp * sin
    return tl.where(in_rot, rotated, x.to(tl.float32)).to(x.dtype)


@triton.jit
def load_kt(  # type: ignore[no-untyped-def]
    k_base, Cos, Sin, cos_off, sin_off, offs_n, offs_d, kv_len, head_dim,
    stride_kn, stride_kd, stride_cn, stride_cd, stride_sn, stride_sd, rotary_dim, ROPE_LAYOUT: tl.constexpr,
):  # fmt: skip
    """The K tile of one kv head at keys offs_n, transposed ([BLOCK_D, BLOCK_N]) for QKᵀ, rotated by RoPE when
    ROPE_LAYOUT >= 0: cos/sin rows by key position, the kv head's table at Cos + cos_off / Sin + sin_off (a
    nonzero cos/sin head stride implies group == 1). The offsets are plain ints, so None tables are never offset."""
    kt = tl.load(
        k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=(offs_n[None, :] < kv_len) & (offs_d[:, None] < head_dim),
        other=0.0,
    )
    if ROPE_LAYOUT >= 0:
        kt = rope_tile(
            kt, k_base, Cos + cos_off, Sin + sin_off, offs_n[None, :], offs_d[:, None], offs_n[None, :] < kv_len,
            offs_d[:, None] < head_dim, stride_kn, stride_kd, stride_cn, stride_cd, stride_sn, stride_sd,
            rotary_dim, ROPE_LAYOUT,
        )  # fmt: skip
    return kt


@triton.jit
def online_softmax(s, m_i, l_i, scale, SCALED: tl.constexpr):  # type: ignore[no-untyped-def]
    """One online-softmax step over masked log2-unit scores: (p, alpha, new row max, new row sum). The caller
    rescales its accumulator by alpha and adds p·V. A row with no kept key so far has max -inf: 0 is subtracted
    instead, so exp2 gives 0 rather than NaN. SCALED: the scores are still to be multiplied by `scale` (> 0, so
    the row max scales with them), which happens inside the exp2 argument as one FMA."""
    if SCALED:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * scale - m_safe[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def softmax_finish(acc, m_i, l_i):  # type: ignore[no-untyped-def]
    """(acc / l, log2-sum-exp) of an online softmax; rows with no kept key get 0 and -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))


@triton.jit
def _partner_columns(  # type: ignore[no-untyped-def]
    y, partner, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SWAP_SPAN: tl.constexpr
):  # fmt: skip
    """y[:, partner(d)] of a [ROWS, BLOCK_D] register tile (valid on the rotary columns).

    SWAP_SPAN > 0 (a power of two: 2 for interleaved, rotary_dim for rotate-half) swaps the two halves of every
    SWAP_SPAN-wide column group with reshape/split/join: a permutation of the register tile (at most a layout
    conversion through shared memory, no global traffic, no extra dot). 0 falls back to tl.gather with the partner
    indices (any rotary_dim, e.g. 40/80/96). Either runs once per program, in the epilogue.
    """
    if SWAP_SPAN > 0:
        groups = tl.permute(tl.reshape(y, [ROWS, BLOCK_D // SWAP_SPAN, 2, SWAP_SPAN // 2]), (0, 1, 3, 2))
        first, second = tl.split(groups)
        return tl.reshape(tl.permute(tl.join(second, first), (0, 1, 3, 2)), [ROWS, BLOCK_D])
    index = tl.minimum(partner, BLOCK_D - 1) + tl.zeros([ROWS, BLOCK_D], dtype=tl.int32)
    return tl.gather(y, index, 1)


@triton.jit
def rope_grad_tile(  # type: ignore[no-untyped-def]
    g, Cos, Sin, offs_row, offs_col, row_ok, col_ok, stride_crow, stride_ccol, stride_srow, stride_scol,
    rotary_dim, ROPE_LAYOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SWAP_SPAN: tl.constexpr,
):  # fmt: skip
    """RoPEᵀ of an fp32 gradient tile g [ROWS, BLOCK_D] taken w.r.t. the rotated x: dx = g·cos - R(g·sin).

    dx[d] = g[d]·cos[d] - sign(d)·(g·sin)[partner(d)] needs only the tile's own cos/sin columns; the partner
    column comes from registers (`_partner_columns`), so the epilogue adds no global traffic beyond cos/sin.
    """
    in_rot = col_ok & (offs_col < rotary_dim)
    ok = row_ok & in_rot
    cos = tl.load(Cos + offs_row * stride_crow + offs_col * stride_ccol, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(Sin + offs_row * stride_srow + offs_col * stride_scol, mask=ok, other=0.0).to(tl.float32)
    partner, sign = _rope_partner(offs_col, rotary_dim, ROPE_LAYOUT)
    swapped = _partner_columns(g * sin, partner, ROWS, BLOCK_D, SWAP_SPAN)
    return tl.where(in_rot, g * cos - sign * swapped, g)


@triton.jit
def dropout_rows(Rng, row, kv_len):  # type: ignore[no-untyped-def]
    """(seed, int64 counter of each row's key 0): counter(b, h, i, j) = offset + ((b·Hq + h)·Nq + i)·Nk + j,
    with row = (b·Hq + h)·Nq + i. Rng is the int64 [seed, offset] tensor, read on device (no host sync)."""
    return tl.load(Rng), tl.load(Rng + 1) + row.to(tl.int64) * kv_len


@triton.jit
def dropout_keep_tile(seed, row_counter, offs_n, drop_p):  # type: ignore[no-untyped-def]
    """Keep mask of a [rows, keys] tile: tl.rand(seed, counter) >= p, exactly reference.dropout_keep's draw."""
    return tl.rand(seed, row_counter[:, None] + offs_n[None, :]) >= drop_p


@triton.jit
def unmasked_key_blocks(  # type: ignore[no-untyped-def]
    blk_lo, blk_hi, first_pos, last_pos, kv_len, window,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
):  # fmt: skip
    """[c_lo, c_hi) within key blocks [blk_lo, blk_hi): blocks inside kv_len that causal and window keep whole for
    every query position in [first_pos, last_pos] (last key <= first_pos; first key inside last_pos's window), so
    their scores need no masking. The caller runs [blk_lo, c_lo) and [c_hi, blk_hi) masked."""
    c_lo = blk_lo
    if USE_WINDOW:
        c_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N), blk_lo), blk_hi)
    c_end = kv_len
    if CAUSAL:
        c_end = tl.minimum(c_end, tl.maximum(first_pos + 1, 0))
    return c_lo, tl.minimum(tl.maximum(c_end // BLOCK_N, c_lo), blk_hi)


@triton.jit
def listed_blocks(  # type: ignore[no-untyped-def]
    BlockIdx, BlockCount, off_b, off_h, outer, stride_ib, stride_ih, stride_im, stride_nb, stride_nh, stride_nm
):  # fmt: skip
    """(list, full, partial) of the launcher's block list (attention_args.BlockList) of one (batch, head, outer
    block): list[0:full] are the tiles nothing masks (the clean loop), the `partial` after them hold a pair the mask
    keeps (the masked loop); tiles the mask keeps nothing of are not listed."""
    counts = BlockCount + off_b * stride_nb + off_h * stride_nh + outer * stride_nm
    full = tl.load(counts)
    return BlockIdx + off_b * stride_ib + off_h * stride_ih + outer * stride_im, full, tl.load(counts + 1) - full


@triton.jit
def nth_block(  # type: ignore[no-untyped-def]
    block, blk_lo, c_lo, c_hi, idx_base, PHASE: tl.constexpr, SKIP_TILES: tl.constexpr
):  # fmt: skip
    """Tile index of a phase's block-th step: phase 0 walks the unmasked tiles [c_lo, c_hi); phase 1 the masked
    ones around them, [blk_lo, c_lo) then [c_hi, ...). With SKIP_TILES those are positions in the launcher's list at
    idx_base, whose full tiles are [0, c_hi) (c_lo = 0) and whose partial tiles follow."""
    if PHASE == 0:
        index = c_lo + block
    elif SKIP_TILES:
        index = c_hi + block
    else:
        index = tl.where(block < c_lo - blk_lo, blk_lo + block, c_hi + block - (c_lo - blk_lo))
    if SKIP_TILES:
        index = tl.load(idx_base + index)
    return index


@triton.jit
def unmasked_query_blocks(  # type: ignore[no-untyped-def]
    lo, num_blocks, start_n, q_len, kv_len, window, pos_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
):  # fmt: skip
    """[i_lo, i_hi) of the query blocks lo + i·BLOCK_M (i < num_blocks) in which every row is a real query that
    causal and window let see every key of the full key block at start_n: their scores need no masking."""
    i_lo = num_blocks * 0
    if CAUSAL:  # the block's first query position must reach the key block's last key
        i_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - pos_offset - lo, 0), BLOCK_M)
    i_lo = tl.minimum(i_lo, num_blocks)
    last_start = q_len - BLOCK_M  # the last block start whose rows are all real queries ...
    if USE_WINDOW:  # ... and whose last query still has the key block's first key inside its window
        last_start = tl.minimum(last_start, start_n + window - BLOCK_M - pos_offset)
    i_hi = tl.where(last_start >= lo, (last_start - lo) // BLOCK_M + 1, 0)
    i_hi = tl.where(start_n + BLOCK_N <= kv_len, i_hi, 0)  # a partial key block masks its missing keys
    return i_lo, tl.minimum(tl.maximum(i_hi, i_lo), num_blocks)


@triton.jit
def recompute_scores(  # type: ignore[no-untyped-def]
    q, kt, offs_m, offs_n, Mask, mask_off, stride_mm, stride_mn, slope,
    q_len, kv_len, qk_scale, softcap_log2, window, pos_offset,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """(scores in log2 units, masked when MASKED, tanh of the scaled scores for the softcap chain rule; the scores
    without it). MASKED False is for tiles of real queries and keys that causal/window keep whole."""
    s = tile_dot(q, kt, INPUT_PRECISION, UPCAST_DOT) * qk_scale
    t = s
    if HAS_SOFTCAP:
        t = tile_tanh(s)
        s = t * softcap_log2
    q_pos = offs_m + pos_offset
    if HAS_ALIBI:
        s += slope * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
    if MASKED:
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
        s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def load_row_stats(Lse, Delta, row, offs_m, q_len):  # type: ignore[no-untyped-def]
    """(lse in log2 units, delta) of BLOCK_M rows; a fully masked row's -inf lse becomes 0: P = exp2(-inf) = 0."""
    lse = tl.load(Lse + row * q_len + offs_m, mask=offs_m < q_len, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    return lse, tl.load(Delta + row * q_len + offs_m, mask=offs_m < q_len, other=0.0)
