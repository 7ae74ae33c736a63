"""Cost terms of the backward families, used by `plan.TiledPlan`: attention (`attention_bwd.py`) and norm
(`norm_kernels.norm_backward_triton`, see `norm_backward_costs`).

Three kernels, one TileConfig: the launcher applies given block_m/block_n to both the dK/dV and the dQ kernel
(and the preprocess kernel takes the dQ kernel's BLOCK_M), so the plan models that case.

- preprocess, grid (cdiv(Nq, BLOCK_M), B·Hq): loads O and dO rows, stores fp32 delta = rowsum(dO∘O).
- dK/dV, grid (cdiv(Nk, BLOCK_N), B·Hkv): loads its K (+ RoPE partner, cos, sin) and V tile once, then for every
  q head of the GQA group (+ its ALiBi slope) and every query block the key block is visible to, the Q (+ RoPE)
  and dO tiles, fp32 lse and delta, the mask tile and (dropout) the rng; RoPEᵀ epilogue loads cos/sin again;
  stores dK and dV.
- dQ, grid (cdiv(Nq, BLOCK_M), B·Hq): loads Q (+ RoPE), dO, lse, delta, the slope and the rng once, then for
  every visible key block K (+ RoPE), V and the mask tile; RoPEᵀ epilogue loads cos/sin again; stores dQ.

The byte convention is plan.py's: every element a program loads or stores counts, masked-off lanes do not. With a
mask tensor both kernels read a block list (counts per program and q head, an int32 index per visited tile), skip
the tiles the mask keeps no pair of and load no mask tile where the mask keeps every pair (and the dK/dV kernel no K/V
tile of a key block no query visits); the plan counts as if none is skipped and every visited tile loads the mask
(an upper bound, exact for masks that neither empty nor fill a tile).
FLOPs: per (query row, key) pair of the visited blocks, dK/dV does S = QKᵀ, dP = dO·Vᵀ, dV += Pᵀ·dO and
dK += dSᵀ·Q (2·(2D + 2Dv)), dQ does S, dP and dQ += dS·K (2·(2D + Dv)).
"""

from __future__ import annotations

from typing import NamedTuple

from tilefuse.specs import AttentionSpec, NormSpec

_F32 = 4  # lse, delta and ALiBi slopes are fp32
_RNG_BYTES = 16  # the int64 [seed, offset] dropout tensor
_LIST_BYTES = 4  # int32 count and index entries of a mask's block list (attention_args.mask_block_list)


def _itemsize(dtype: str) -> int:
    return 4 if dtype.removeprefix("torch.") == "float32" else 2  # norm kernels take float16/bfloat16/float32


class BwdDims(NamedTuple):
    """Static sizes of one backward plan (plan.py checks they are static) and its element sizes."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    block_m: int
    block_n: int
    es: int  # q/k/v/dO/O (and cos/sin) element size
    mask_es: int  # 0 without a mask tensor
    pos_offset: int


class BackwardCosts(NamedTuple):
    preprocess_grid: tuple[int, int]
    dkdv_grid: tuple[int, int]
    dq_grid: tuple[int, int]
    read_bytes: int
    write_bytes: int
    flops: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _span(start: int, block: int, length: int) -> int:
    """Valid elements of the block starting at `start` (rows past the end are masked off)."""
    return max(0, min(block, length - start))


def _query_blocks(spec: AttentionSpec, dims: BwdDims, start_n: int) -> range:
    """The dK/dV kernel's `range(lo, hi, BLOCK_M)` for the key block at start_n."""
    lo, hi = 0, dims.q_len
    if spec.causal:
        lo = max(start_n - dims.pos_offset, 0) // dims.block_m * dims.block_m
    if spec.window:
        hi = min(hi, min(start_n + dims.block_n, dims.kv_len) - 1 + spec.window - dims.pos_offset)
    return range(lo, hi, dims.block_m)


def _key_blocks(spec: AttentionSpec, dims: BwdDims, start_m: int) -> range:
    """The dQ kernel's `range(lo, hi, BLOCK_N)` for the query block at start_m (the forward's key range)."""
    lo, hi = 0, dims.kv_len
    if spec.causal:
        hi = min(hi, min(start_m + dims.block_m, dims.q_len) + dims.pos_offset)
    if spec.window:
        lo = max(start_m + dims.pos_offset - spec.window + 1, 0) // dims.block_n * dims.block_n
    return range(lo, hi, dims.block_n)


def _row_bytes(spec: AttentionSpec, dims: BwdDims) -> tuple[int, int]:
    """(bytes per loaded query row: Q (+ RoPE partner, cos, sin), dO, lse, delta; per loaded key row: K (+ RoPE), V)."""
    rope = 3 * spec.rope.rotary_dim * dims.es if spec.rope else 0
    q_row = (spec.head_dim + spec.v_head_dim) * dims.es + rope + 2 * _F32
    return q_row, (spec.head_dim + spec.v_head_dim) * dims.es + rope


def _dkdv(spec: AttentionSpec, dims: BwdDims) -> tuple[int, int, int]:
    """(read, write, visited pairs) of the dK/dV kernel, all programs."""
    q_row, k_row = _row_bytes(spec, dims)
    group = dims.q_heads // dims.kv_heads
    epilogue = 2 * spec.rope.rotary_dim * dims.es if spec.rope else 0
    read = write = pairs = 0
    for start_n in range(0, dims.kv_len, dims.block_n):
        keys = _span(start_n, dims.block_n, dims.kv_len)
        read += keys * (k_row + epilogue) + group * (_F32 if spec.alibi else 0)
        write += keys * (spec.head_dim + spec.v_head_dim) * dims.es
        if dims.mask_es:  # per q head of the group its by-key list: the listed count (read first, to know whether
            # any query visits the key block: K/V are loaded only then), both counts, an index per query block
            read += group * _LIST_BYTES * (3 + len(_query_blocks(spec, dims, start_n)))
        for start_m in _query_blocks(spec, dims, start_n):
            rows = _span(start_m, dims.block_m, dims.q_len)
            read += group * (rows * q_row + rows * keys * dims.mask_es + (_RNG_BYTES if spec.dropout_p > 0 else 0))
            pairs += group * rows * keys
    programs = dims.batch * dims.kv_heads
    return read * programs, write * programs, pairs * programs


def _dq(spec: AttentionSpec, dims: BwdDims) -> tuple[int, int, int]:
    """(read, write, visited pairs) of the dQ kernel, all programs."""
    q_row, k_row = _row_bytes(spec, dims)
    epilogue = 2 * spec.rope.rotary_dim * dims.es if spec.rope else 0
    once = (_F32 if spec.alibi else 0) + (_RNG_BYTES if spec.dropout_p > 0 else 0)
    read = write = pairs = 0
    for start_m in range(0, dims.q_len, dims.block_m):
        rows = _span(start_m, dims.block_m, dims.q_len)
        read += rows * (q_row + epilogue) + once
        if dims.mask_es:  # the forward's list: two counts (full, listed) and an index per key block
            read += _LIST_BYTES * (2 + len(_key_blocks(spec, dims, start_m)))
        write += rows * spec.head_dim * dims.es
        for start_n in _key_blocks(spec, dims, start_m):
            keys = _span(start_n, dims.block_n, dims.kv_len)
            read += keys * k_row + rows * keys * dims.mask_es
            pairs += rows * keys
    programs = dims.batch * dims.q_heads
    return read * programs, write * programs, pairs * programs


def backward_costs(spec: AttentionSpec, dims: BwdDims) -> BackwardCosts:
    """Grids, bytes and FLOPs of the preprocess, dK/dV and dQ kernels (bytes and FLOPs summed over all three)."""
    heads = dims.batch * dims.q_heads
    pre_read = heads * dims.q_len * 2 * spec.v_head_dim * dims.es
    pre_write = heads * dims.q_len * _F32
    kv_read, kv_write, kv_pairs = _dkdv(spec, dims)
    q_read, q_write, q_pairs = _dq(spec, dims)
    d, dv = spec.head_dim, spec.v_head_dim
    flops = 4 * kv_pairs * (d + dv) + 2 * q_pairs * (2 * d + dv)
    q_grid = (_cdiv(dims.q_len, dims.block_m), heads)
    return BackwardCosts(
        preprocess_grid=q_grid,
        dkdv_grid=(_cdiv(dims.kv_len, dims.block_n), dims.batch * dims.kv_heads),
        dq_grid=q_grid,
        read_bytes=pre_read + kv_read + q_read,
        write_bytes=pre_write + kv_write + q_write,
        flops=flops,
    )


def backward_smem_bytes(dims: BwdDims, block_d: int, block_dv: int, num_stages: int) -> int:
    """Shared memory of the larger of the two main kernels: one resident tile pair (K, V for dK/dV; Q, dO for dQ)
    plus the streamed tile pair and mask tile × num_stages, padded blocks."""
    bm, bn, es = dims.block_m, dims.block_n, dims.es
    streamed_q = bm * (block_d + block_dv) * es
    streamed_k = bn * (block_d + block_dv) * es
    mask = bm * bn * dims.mask_es
    dkdv = streamed_k + (streamed_q + mask) * num_stages
    dq = streamed_q + (streamed_k + mask) * num_stages
    return max(dkdv, dq)


# ----------------------------------------------------------------------------------------------- norm backward
DEFAULT_NORM_BWD_PROGRAMS = 132  # the launcher uses one program per SM; 132 = an H100 SXM


class NormBwdCosts(NamedTuple):
    grid: tuple[int]
    read_bytes: int
    write_bytes: int
    flops: int


def norm_backward_costs(spec: NormSpec, rows: int, programs: int | None, chunked: bool = False) -> NormBwdCosts:
    """`norm_kernels.norm_backward_triton`: min(rows, programs) programs each reduce cdiv(rows, P) rows. A program
    loads the weight once, then per row dy (in `spec.out_dtype`), x, fp32 rstd (+ mean for LayerNorm), and stores
    dx; at the end it stores one fp32 partial dweight and dbias row each (the torch sum after it is not counted).
    Chunked rows (`chunked`) read dy, x and the weight in both passes of every row and add each row into the fp32
    partial dbias (and, with a weight, dweight) row: a read and a write of it per row instead of one final store.
    FLOPs per element: x̂ (2), dW and dB sums (3), g·w (1), the row dot (2), dx (2) [+ 2 LayerNorm centering]."""
    grid = max(1, min(rows, programs or DEFAULT_NORM_BWD_PROGRAMS))
    es, width, layer = _itemsize(spec.dtype), spec.width, spec.norm == "layernorm"
    per_row = width * (_itemsize(spec.out_dtype) + es) + _F32 * (1 + layer)
    weight = width * es if spec.has_weight else 0
    flops = (10 + 2 * layer) * width * rows
    if chunked:
        partials = width * _F32 * (1 + spec.has_weight)
        read = rows * (2 * (per_row + weight) - _F32 * (1 + layer) + partials)
        return NormBwdCosts((grid,), read, rows * (width * es + partials), flops)
    read = rows * per_row + grid * weight
    write = rows * width * es + grid * 2 * width * _F32
    return NormBwdCosts((grid,), read, write, flops)
