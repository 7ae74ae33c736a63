"""The attention backward (`attention_bwd.py`): preprocess, dK/dV and dQ kernels under one TileConfig (the launcher
applies given block_m/block_n to both main kernels, and the preprocess kernel takes the dQ kernel's BLOCK_M).

- preprocess, grid (cdiv(Nq, BLOCK_M), B·Hq): loads O and dO rows, stores fp32 delta = rowsum(dO∘O).
- dK/dV, grid (cdiv(Nk, BLOCK_N), B·Hkv): loads its K (+ RoPE partner, cos, sin) and V tile once, then for every
  q head of the GQA group (+ its ALiBi slope) and every query block the key block is visible to, the Q (+ RoPE)
  and dO tiles, fp32 lse and delta, the mask tile and (dropout) the rng; RoPEᵀ epilogue loads cos/sin again;
  stores dK and dV.
- dQ, grid (cdiv(Nq, BLOCK_M), B·Hq): loads Q (+ RoPE), dO, lse, delta, the slope and the rng once, then for
  every visible key block K (+ RoPE), V and the mask tile; RoPEᵀ epilogue loads cos/sin again; stores dQ.

With a mask tensor both kernels read a block list (counts per program and q head, an int32 index per visited tile),
skip the tiles the mask keeps no pair of and load no mask tile where the mask keeps every pair (and the dK/dV
kernel no K/V tile of a key block no query visits); the plan counts as if none is skipped and every visited tile
loads the mask (an upper bound, exact for masks that neither empty nor fill a tile).
FLOPs: per (query row, key) pair of the visited blocks, dK/dV does S = QKᵀ, dP = dO·Vᵀ, dV += Pᵀ·dO and
dK += dSᵀ·Q (2·(2D + 2Dv)), dQ does S, dP and dQ += dS·K (2·(2D + Dv)).
"""

from __future__ import annotations

from typing import NamedTuple

from tilefuse.codegen.attention_args import RopeArgs, backward_config, rope_swap_span
from tilefuse.codegen.kernel_variant import KernelVariant, attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import AttentionSpec, rope_layout_code

from .attention import (
    AttentionFamily,
    attention_consts,
    attention_ints,
    attention_pointers,
    block_list_ints,
    launch_name,
    mask_bytes,
    pos_offset,
)
from .base import BLOCK_LIST_BYTES, F32_BYTES, RNG_BYTES, itemsize, knobs, static


class BwdDims(NamedTuple):
    """Static sizes of one backward plan and its element sizes."""

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
    q_row = (spec.head_dim + spec.v_head_dim) * dims.es + rope + 2 * F32_BYTES
    return q_row, (spec.head_dim + spec.v_head_dim) * dims.es + rope


def _dkdv(spec: AttentionSpec, dims: BwdDims) -> tuple[int, int, int]:
    """(read, write, visited pairs) of the dK/dV kernel, all programs."""
    q_row, k_row = _row_bytes(spec, dims)
    group = dims.q_heads // dims.kv_heads
    epilogue = 2 * spec.rope.rotary_dim * dims.es if spec.rope else 0
    read = write = pairs = 0
    for start_n in range(0, dims.kv_len, dims.block_n):
        keys = _span(start_n, dims.block_n, dims.kv_len)
        read += keys * (k_row + epilogue) + group * (F32_BYTES if spec.alibi else 0)
        write += keys * (spec.head_dim + spec.v_head_dim) * dims.es
        if dims.mask_es:  # per q head of the group its by-key list: the listed count (read first, to know whether
            # any query visits the key block: K/V are loaded only then), both counts, an index per query block
            read += group * BLOCK_LIST_BYTES * (3 + len(_query_blocks(spec, dims, start_n)))
        for start_m in _query_blocks(spec, dims, start_n):
            rows = _span(start_m, dims.block_m, dims.q_len)
            read += group * (rows * q_row + rows * keys * dims.mask_es + (RNG_BYTES if spec.dropout_p > 0 else 0))
            pairs += group * rows * keys
    programs = dims.batch * dims.kv_heads
    return read * programs, write * programs, pairs * programs


def _dq(spec: AttentionSpec, dims: BwdDims) -> tuple[int, int, int]:
    """(read, write, visited pairs) of the dQ kernel, all programs."""
    q_row, k_row = _row_bytes(spec, dims)
    epilogue = 2 * spec.rope.rotary_dim * dims.es if spec.rope else 0
    once = (F32_BYTES if spec.alibi else 0) + (RNG_BYTES if spec.dropout_p > 0 else 0)
    read = write = pairs = 0
    for start_m in range(0, dims.q_len, dims.block_m):
        rows = _span(start_m, dims.block_m, dims.q_len)
        read += rows * (q_row + epilogue) + once
        if dims.mask_es:  # the forward's list: two counts (full, listed) and an index per key block
            read += BLOCK_LIST_BYTES * (2 + len(_key_blocks(spec, dims, start_m)))
        write += rows * spec.head_dim * dims.es
        for start_n in _key_blocks(spec, dims, start_m):
            keys = _span(start_n, dims.block_n, dims.kv_len)
            read += keys * k_row + rows * keys * dims.mask_es
            pairs += rows * keys
    programs = dims.batch * dims.q_heads
    return read * programs, write * programs, pairs * programs


class AttentionBackwardFamily(AttentionFamily):
    """Never dispatched by "auto": a site's backward launches it. `grid` is the dK/dV kernel's, `backward_costs`
    has all three grids, and the bytes and FLOPs are the three kernels' sum."""

    name = "attention_backward"
    backward = True
    kernel_source = ("tilefuse.codegen.attention_bwd", "attention_bwd_dkdv_kernel")
    choices = knobs(block_m=(16, 32, 64, 128), block_n=(16, 32, 64, 128), num_warps=(2, 4, 8),
               num_stages=(1, 2, 3))  # fmt: skip

    def launcher_default(self, spec: AttentionSpec) -> TileConfig:
        return self.launcher_configs(spec)[0]

    def launcher_configs(self, spec: AttentionSpec) -> tuple[TileConfig, TileConfig]:
        """The dK/dV and the dQ kernel's configs when the launcher is given none (each kernel has its own; a plan
        of the family reads the dK/dV kernel's)."""
        masked, rope, dropout = spec.mask != "none", spec.rope is not None, bool(spec.dropout_p)
        dkdv, dq = backward_config(max(spec.head_dim, spec.v_head_dim), masked, rope, dropout)
        return TileConfig(*dkdv), TileConfig(*dq)

    def dims(self, spec: AttentionSpec, config: TileConfig) -> BwdDims:
        block_m, block_n = self.blocks(spec, config)[:2]
        return BwdDims(
            static("batch", spec.batch), static("q_heads", spec.q_heads), static("kv_heads", spec.kv_heads),
            static("q_len", spec.q_len), static("kv_len", spec.kv_len), block_m, block_n, itemsize(spec.dtype),
            mask_bytes(spec), pos_offset(spec),
        )  # fmt: skip

    def costs(self, spec: AttentionSpec, config: TileConfig) -> BackwardCosts:
        """Grids, bytes and FLOPs of the preprocess, dK/dV and dQ kernels (bytes and FLOPs summed over all three)."""
        dims = self.dims(spec, config)
        heads = dims.batch * dims.q_heads
        pre_read = heads * dims.q_len * 2 * spec.v_head_dim * dims.es
        pre_write = heads * dims.q_len * F32_BYTES
        kv_read, kv_write, kv_pairs = _dkdv(spec, dims)
        q_read, q_write, q_pairs = _dq(spec, dims)
        d, dv = spec.head_dim, spec.v_head_dim
        q_grid = (-(-dims.q_len // dims.block_m), heads)
        return BackwardCosts(
            preprocess_grid=q_grid,
            dkdv_grid=(-(-dims.kv_len // dims.block_n), dims.batch * dims.kv_heads),
            dq_grid=q_grid,
            read_bytes=pre_read + kv_read + q_read,
            write_bytes=pre_write + kv_write + q_write,
            flops=4 * kv_pairs * (d + dv) + 2 * q_pairs * (2 * d + dv),
        )

    def grid(self, spec: AttentionSpec, config: TileConfig) -> tuple[int, ...]:
        return self.costs(spec, config).dkdv_grid

    def smem_bytes(self, spec: AttentionSpec, config: TileConfig) -> int:
        """The larger of the two main kernels: one resident tile pair (K, V for dK/dV; Q, dO for dQ) plus the
        streamed tile pair and mask tile × num_stages, padded blocks."""
        bm, bn, bd, bdv = self.blocks(spec, config)
        es, stages = itemsize(spec.dtype), config.num_stages
        streamed_q, streamed_k = bm * (bd + bdv) * es, bn * (bd + bdv) * es
        mask = bm * bn * mask_bytes(spec)
        return max(streamed_k + (streamed_q + mask) * stages, streamed_q + (streamed_k + mask) * stages)

    def sram_bytes(self, spec: AttentionSpec, config: TileConfig) -> int:
        """`smem_bytes` + fp32 dK, dV [BN, BD + BDV] + fp32 P and dP [BM, BN]."""
        bm, bn, bd, bdv = self.blocks(spec, config)
        return self.smem_bytes(spec, config) + 4 * (bn * (bd + bdv) + 2 * bm * bn)

    def variants(self, spec: AttentionSpec, config: TileConfig) -> tuple[KernelVariant, ...]:
        """The dK/dV and the dQ kernel, both at the plan's knobs (as the launcher runs them when given knobs); the
        small preprocess kernel is left out."""
        blocks = self.blocks(spec, config)
        layout = rope_layout_code(spec.rope.layout if spec.rope else None)
        rope = RopeArgs(None, None, (), (), spec.rope.rotary_dim if spec.rope else 0, layout)
        consts = attention_consts(spec, blocks) | {"SWAP_SPAN": rope_swap_span(rope)}
        pointers = attention_pointers(spec, "Q K V DO DQ DK DV", "Lse Delta")
        ints = backward_ints(attention_ints(spec))
        floats = ("sm_scale", "qk_scale", "softcap_log2", "drop_p", "drop_scale")
        kernels = (("dkdv", attention_bwd_dkdv_kernel, True), ("dq", attention_bwd_dq_kernel, False))
        return tuple(
            KernelVariant(launch_name(f"attention_bwd_{kind}_d{spec.head_dim}", blocks, config), loader, pointers,
                          floats, consts, config.num_warps, config.num_stages,
                          ints | block_list_ints(spec, blocks[0], blocks[1], by_key))
            for kind, loader, by_key in kernels
        )  # fmt: skip


def backward_ints(forward: dict[str, int]) -> dict[str, int]:
    """Integer arguments of the backward kernels from the forward's (`attention_ints`): contiguous dO and dQ strided
    like O and Q, dK and dV like K and V."""
    ints = dict(forward)
    for grad, like, dims in (("g", "o", "bhmd"), ("dq", "q", "bhmd"), ("dk", "k", "bhnd"), ("dv", "v", "bhnd")):
        ints |= {f"stride_{grad}{dim}": forward[f"stride_{like}{dim}"] for dim in dims}
    return ints


ATTENTION_BACKWARD = AttentionBackwardFamily()
