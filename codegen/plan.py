"""TiledPlan: a Spec plus a tile config, and what that pair costs — grid, loop structure, HBM bytes, SRAM, FLOPs.

The plan mirrors the launchers in `attention_fwd.py`, `attention_decode.py`, `norm_kernels.py` and `rope_kernels.py`
exactly (it reuses their block-size helpers, so a tile the launcher clamps is clamped here too);
`tests/codegen/test_plan.py` checks its byte counts against what the kernels really load and store under the
interpreter (`codegen/io_count.py`).

Byte convention (all families): a byte counts when an element is *loaded or stored by a program*. Masked-off lanes
(rows past the sequence end, padded head-dim columns, padded widths) do not count. Every program's loads count,
even when several programs (or several tiles of one program) read the same address — e.g. K/V re-read by every query
block and every query head of a GQA group, a broadcast key-padding mask re-read per query row, the norm weight
re-read per row, cos/sin re-read per head. Caches are ignored: this is the traffic a kernel issues, an upper bound
of what DRAM sees. With a mask tensor the attention kernels (forward, decode and both backward kernels) skip the
tiles the mask keeps nothing of (data the plan cannot see) and read a block list instead, and the forward and backward
kernels run the tiles the mask keeps whole without loading its tile; the plan counts the list as if no tile is
skipped and every visited tile loads the mask, again an upper bound (exact when the mask neither empties nor fills a
tile). The attention backward family's cost terms live in `plan_backward.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict

import triton

from tilefuse.codegen import norm_kernels as _norm
from tilefuse.codegen import plan_backward as bwd
from tilefuse.codegen.attention_decode import MAX_DECODE_ROWS, SplitLayout, max_decode_rows, split_layout, use_decode
from tilefuse.codegen.attention_fwd import MAX_HEAD_DIM, pow2_block
from tilefuse.codegen.reference import AttnFlags
from tilefuse.codegen.rope_kernels import DEFAULT_BLOCK_ROWS as _ROPE_BLOCK_ROWS
from tilefuse.codegen.rope_kernels import DEFAULT_WARPS as _ROPE_WARPS
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "bool": 1, "uint8": 1, "int8": 1}
_LSE_BYTES = 4  # log-sum-exp is fp32
_BLOCK_LIST_BYTES = 4  # int32 entries of a mask's block lists (attention_args.mask_block_list / mask_kept_blocks)
_STAT_BYTES = 4  # norm mean/rstd are fp32
_ALIBI_BYTES = 4  # ALiBi slopes are assumed fp32 (the Spec does not record their dtype)
_SCRATCH_BYTES = 4  # split-KV partial outputs and log2-sum-exps are fp32
_RNG_BYTES = 16  # the int64 [seed, offset] dropout tensor, read by every program that draws
FAMILIES = ("auto", "attention_fwd", "attention_decode", "attention_backward", "norm", "norm_backward", "rope")


def itemsize(dtype: str) -> int:
    """Bytes per element of a Spec dtype string ('float16', 'torch.bfloat16', ...)."""
    name = dtype.removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_ITEMSIZE)}")
    return _ITEMSIZE[name]


def _static(name: str, value: int | None) -> int:
    if value is None:
        raise ValueError(f"TiledPlan needs static shapes; {name} is dynamic (None)")
    return value


class AttentionKnobs(TypedDict, total=False):
    """The knobs the FA2 forward and backward launchers take (`TileConfig.attention_knobs`); a knob left out takes
    the launcher's default."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class DecodeKnobs(TypedDict, total=False):
    """The knobs the split-KV decode launcher takes (`TileConfig.decode_knobs`); a knob left out takes the
    launcher's default."""

    block_n: int
    num_splits: int | None
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class TileConfig:
    """Launch knobs; a plan describes exactly the knobs it is given (`launcher_config` gives each family's defaults).

    Which knobs each kernel family reads (the others are ignored and kept at their defaults by the search spaces):
    attention forward and backward: block_m, block_n, num_warps, num_stages (the backward applies them to both its
    dK/dV and dQ kernel); decode: block_n, num_warps, num_stages, num_splits (its rows are the GQA group's query
    rows; num_splits None means its heuristic); norm: num_warps and block_n as the row block (columns a row program
    holds at once, a power of two: a wider row runs the chunked kernels, block_n columns per chunk; the TileConfig
    default 64 chunks any row wider than 64, so plan a norm with `launcher_config`'s); norm backward: the same and
    num_splits as its program count (None: 132, H100's SMs); RoPE: block_m as rows per program, num_warps.
    block_m/block_n are requests for attention: the launcher shrinks them to the problem
    (max(16, min(block, next_pow2(N))))."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None

    def attention_knobs(self) -> AttentionKnobs:
        """The keyword arguments of the FA2 forward and backward launchers."""
        return AttentionKnobs(block_m=self.block_m, block_n=self.block_n, num_warps=self.num_warps,
                              num_stages=self.num_stages)  # fmt: skip

    def decode_knobs(self) -> DecodeKnobs:
        """The keyword arguments of the split-KV decode launcher."""
        return DecodeKnobs(block_n=self.block_n, num_splits=self.num_splits, num_warps=self.num_warps,
                           num_stages=self.num_stages)  # fmt: skip


class _DecodeCosts(NamedTuple):
    read_bytes: int
    write_bytes: int
    flops: int


@dataclass(frozen=True)
class TiledPlan:
    """Spec + TileConfig: grid, loop structure, HBM bytes read/written, SRAM per program, FLOPs, feasibility.

    Attention (forward, `attention_fwd_kernel`): grid (cdiv(Nq, BLOCK_M), B·Hq). Program (m, bh) loads its Q tile
    once, then for every key block in `key_blocks_per_program(m)` a K and a V tile (and a mask tile when the Spec has
    a mask tensor), and stores its O rows and fp32 lse. Mask element size: 1 byte for boolean / key_padding (the
    launcher views bool as uint8), the attention dtype for additive masks. RoPE adds, for the Q tile and every K
    tile, the partner columns and cos/sin (rotary_dim each per row, cos/sin assumed in `spec.dtype`); dropout adds
    the int64 [seed, offset] rng read once per program.

    Attention backward (family="attention_backward", never picked by "auto"): preprocess + dK/dV + dQ kernels
    (`plan_backward.py`); `grid` is the dK/dV kernel's, `backward_costs()` has all three grids, and the bytes and
    FLOPs are the three kernels' sum. block_m/block_n apply to both main kernels, as the launcher's given knobs do.
    Norm backward (family="norm_backward"): `plan_backward.norm_backward_costs`.

    Norm: one program per row. Reads x (+ residual) (+ weight, + bias, once per row), writes y (+ the sum) and the
    fp32 rstd (+ mean for LayerNorm). Residual, weight and bias are assumed in `spec.dtype`; y in `spec.out_dtype`.
    A chunked row (`norm_chunked`) reads x again in its second pass (the stored sum, with a residual).

    RoPE: grid cdiv(rows, 16). Per row: reads head_dim elements of x and rotary_dim of cos and of sin (cos/sin
    assumed in `spec.dtype`), writes head_dim elements of y.

    Attention decode (`attention_decode.py`, split-KV): phase 1 grid (num_splits, B·Hkv); a working split loads the
    group's Q rows (group·Nq), its key blocks' K, V (and mask, ALiBi, RoPE partner + cos/sin in `spec.dtype`; with a
    mask two prefix counts and an index entry per key block) and stores fp32 partial rows (Dv + 1 values each);
    splits past the visible range move nothing. Phase 2 (one program
    per query row) loads the working splits' partials and stores O and lse. `family` picks the kernel: "auto" is
    what codegen/gpu.py dispatches (`use_decode`).
    """

    spec: AttentionSpec | NormSpec | RopeSpec
    config: TileConfig = TileConfig()
    family: str = "auto"

    @property
    def kernel_family(self) -> str:
        """The kernel this plan describes: attention_fwd, attention_decode, attention_backward, norm or rope."""
        spec = self.spec
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}; expected one of {FAMILIES}")
        if not isinstance(spec, AttentionSpec):
            backward = isinstance(spec, NormSpec) and self.family == "norm_backward"
            return "rope" if isinstance(spec, RopeSpec) else "norm_backward" if backward else "norm"
        if self.family != "auto":
            return self.family
        q_len, kv_len = _static("q_len", spec.q_len), _static("kv_len", spec.kv_len)
        decode = use_decode(q_len, kv_len, self._group(), max(spec.head_dim, spec.v_head_dim))
        return "attention_decode" if decode else "attention_fwd"

    @property
    def _decode(self) -> bool:
        return isinstance(self.spec, AttentionSpec) and self.kernel_family == "attention_decode"

    @property
    def _backward(self) -> bool:
        return isinstance(self.spec, AttentionSpec) and self.kernel_family == "attention_backward"

    # ------------------------------------------------------------------------------------------- shared knobs
    @property
    def blocks(self) -> tuple[int, ...]:
        """The blocks the launcher really uses: attention (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV); norm (BLOCK,);
        RoPE (BLOCK_ROWS, BLOCK_HALF, BLOCK_TAIL)."""
        spec = self.spec
        if isinstance(spec, AttentionSpec):
            block_m = self.config.block_m
            rows = _static("q_len", spec.q_len)
            if self._decode:  # one tile holds every query row of a GQA group
                block_m, rows = MAX_DECODE_ROWS, rows * self._group()
            return (
                pow2_block(block_m, rows),
                pow2_block(self.config.block_n, _static("kv_len", spec.kv_len)),
                pow2_block(MAX_HEAD_DIM, spec.head_dim),
                pow2_block(MAX_HEAD_DIM, spec.v_head_dim),
            )
        if isinstance(spec, NormSpec):
            return (_norm.row_block(spec.width, self.config.block_n),)
        half, tail = spec.rotary_dim // 2, spec.head_dim - spec.rotary_dim
        return (self.config.block_m, int(triton.next_power_of_2(half)), int(triton.next_power_of_2(max(tail, 1))))

    @property
    def grid(self) -> tuple[int, ...]:
        spec = self.spec
        if isinstance(spec, AttentionSpec) and self._decode:
            return (self.decode_layout().num_splits, _static("batch", spec.batch) * _static("kv_heads", spec.kv_heads))
        if isinstance(spec, AttentionSpec) and self._backward:
            return self.backward_costs().dkdv_grid
        if isinstance(spec, AttentionSpec):
            heads = _static("batch", spec.batch) * _static("q_heads", spec.q_heads)
            return (triton.cdiv(_static("q_len", spec.q_len), self.blocks[0]), heads)
        if isinstance(spec, NormSpec):
            return self._norm_bwd().grid if self.kernel_family == "norm_backward" else (self._rows(),)
        return (triton.cdiv(self._rows(), self.config.block_m),)

    def _rows(self) -> int:
        spec = self.spec
        if isinstance(spec, AttentionSpec):
            raise TypeError("rows are defined for norm and RoPE plans only")
        if not spec.shape:
            raise ValueError(f"{type(spec).__name__} needs a static shape to plan, got ()")
        return math.prod(_static(f"shape[{i}]", d) for i, d in enumerate(spec.shape[:-1]))

    # ------------------------------------------------------------------------------------ attention structure
    def _attn(self) -> AttentionSpec:
        if not isinstance(self.spec, AttentionSpec):
            raise TypeError(f"attention-only query on a {type(self.spec).__name__} plan")
        return self.spec

    def _pos_offset(self) -> int:
        spec = self._attn()
        return _static("kv_len", spec.kv_len) - _static("q_len", spec.q_len) if spec.align == "bottom_right" else 0

    def key_blocks_per_program(self, m: int) -> range:
        """Start columns of the key blocks query block `m` visits, exactly the kernel's `range(lo, hi, BLOCK_N)`:
        causal stops after the block holding the last row's position; a window starts at the block holding
        `first_pos - window + 1` (floored to BLOCK_N); positions shift by Nk - Nq for bottom-right alignment."""
        spec = self._attn()
        q_len, kv_len = _static("q_len", spec.q_len), _static("kv_len", spec.kv_len)
        block_m, block_n = self.blocks[0], self.blocks[1]
        pos_offset = self._pos_offset()
        lo, hi = 0, kv_len
        if spec.causal:
            last_pos = min(m * block_m + block_m, q_len) - 1 + pos_offset
            hi = min(hi, last_pos + 1)
        if spec.window:
            lo = max(m * block_m + pos_offset - spec.window + 1, 0) // block_n * block_n
        return range(lo, hi, block_n)

    def _rows_in_block(self, m: int) -> int:
        q_len = _static("q_len", self._attn().q_len)
        return max(0, min(self.blocks[0], q_len - m * self.blocks[0]))

    def _keys_visited(self, m: int) -> int:
        """Valid (in-range) key columns over all key blocks query block m loads."""
        starts = self.key_blocks_per_program(m)
        if len(starts) == 0:
            return 0
        kv_len = _static("kv_len", self._attn().kv_len)
        return min(starts[-1] + self.blocks[1], kv_len) - starts[0]

    def _group(self) -> int:
        spec = self._attn()
        return _static("q_heads", spec.q_heads) // max(_static("kv_heads", spec.kv_heads), 1)

    def decode_layout(self) -> SplitLayout:
        """The decode launcher's cut of the visible key range into splits (`attention_decode.split_layout`)."""
        spec = self._attn()
        flags = AttnFlags(spec.scale, spec.causal, spec.align == "bottom_right", spec.window or 0)
        programs = _static("batch", spec.batch) * _static("kv_heads", spec.kv_heads)
        q_len, kv_len = _static("q_len", spec.q_len), _static("kv_len", spec.kv_len)
        return split_layout(q_len, kv_len, self.blocks[1], flags, programs, self.config.num_splits)

    @property
    def combine_grid(self) -> tuple[int, ...]:
        """Grid of the decode family's phase 2 (one program per query row); () for every other family."""
        if not self._decode:
            return ()
        spec = self._attn()
        return (_static("batch", spec.batch) * _static("q_heads", spec.q_heads) * _static("q_len", spec.q_len),)

    def _decode_costs(self) -> _DecodeCosts:
        """Bytes and FLOPs of both decode phases: phase 1 summed over the working splits of one (batch, kv head) and
        scaled by B·Hkv, phase 2 per query row (it reads the working splits' partials)."""
        spec = self._attn()
        es, d, dv, bn = itemsize(spec.dtype), spec.head_dim, spec.v_head_dim, self.blocks[1]
        layout, (splits, programs) = self.decode_layout(), self.grid
        kv_len, rows = _static("kv_len", spec.kv_len), self._group() * _static("q_len", spec.q_len)
        per_row = d * es + (_ALIBI_BYTES if spec.alibi else 0) + (3 * spec.rope.rotary_dim * es if spec.rope else 0)
        per_key = (d + dv) * es + (3 * spec.rope.rotary_dim * es if spec.rope else 0)
        read = write = pairs = 0
        for split in range(layout.work_splits):
            lo = layout.vis_lo + split * layout.split_len
            last = range(lo, min(lo + layout.split_len, layout.vis_hi), bn)[-1]
            keys = min(last + bn, kv_len) - lo
            read += rows * per_row + keys * per_key + rows * keys * self._mask_bytes()
            if self._mask_bytes():  # the kept-block list: prefix counts at both ends, an index per key block
                read += _BLOCK_LIST_BYTES * (2 + (last - lo) // bn + 1)
            write += rows * (dv + 1) * _SCRATCH_BYTES
            pairs += rows * keys
        read = read * programs + (_RNG_BYTES * splits * programs if spec.dropout_p > 0 else 0)
        q_rows = self.combine_grid[0]
        read += q_rows * layout.work_splits * (dv + 1) * _SCRATCH_BYTES
        write = write * programs + q_rows * (dv * es + _LSE_BYTES)
        return _DecodeCosts(read, write, 2 * pairs * (d + dv) * programs)

    def _bwd_dims(self) -> bwd.BwdDims:
        spec = self._attn()
        return bwd.BwdDims(
            _static("batch", spec.batch), _static("q_heads", spec.q_heads), _static("kv_heads", spec.kv_heads),
            _static("q_len", spec.q_len), _static("kv_len", spec.kv_len), self.blocks[0], self.blocks[1],
            itemsize(spec.dtype), self._mask_bytes(), self._pos_offset(),
        )  # fmt: skip

    def backward_costs(self) -> bwd.BackwardCosts:
        """Grids, bytes and FLOPs of the backward family's three kernels (`plan_backward.backward_costs`)."""
        if not self._backward:
            raise TypeError(f"backward_costs() needs family='attention_backward', got {self.kernel_family!r}")
        return bwd.backward_costs(self._attn(), self._bwd_dims())

    @property
    def norm_chunked(self) -> bool:
        """Whether a norm plan's rows run the chunked kernels (wider than the row block `blocks[0]`)."""
        return isinstance(self.spec, NormSpec) and _norm.is_chunked(self.spec.width, self.blocks[0])

    def _norm_bwd(self) -> bwd.NormBwdCosts:
        assert isinstance(self.spec, NormSpec)
        return bwd.norm_backward_costs(self.spec, self._rows(), self.config.num_splits, self.norm_chunked)

    def _multi_costs(self) -> _DecodeCosts | bwd.BackwardCosts | bwd.NormBwdCosts | None:
        """Costs of the families with their own cost function (decode, both backwards); None for the others."""
        family = self.kernel_family
        if family == "attention_decode":
            return self._decode_costs()
        if family == "attention_backward":
            return self.backward_costs()
        return self._norm_bwd() if family == "norm_backward" else None

    def _forward_read(self) -> int:
        """Forward kernel loads: per query block its Q tile (+ RoPE), every visited K/V tile (+ RoPE, mask tile),
        the ALiBi slope, the rng, and the mask's block list; times B·Hq."""
        spec = self._attn()
        es, mask_es = itemsize(spec.dtype), self._mask_bytes()
        rope = 3 * spec.rope.rotary_dim * es if spec.rope else 0  # partner columns, cos and sin of each row
        once = (_ALIBI_BYTES if spec.alibi else 0) + (_RNG_BYTES if spec.dropout_p > 0 else 0)
        per_head = 0
        for m in range(self.grid[0]):
            rows, keys = self._rows_in_block(m), self._keys_visited(m)
            per_head += rows * (spec.head_dim * es + rope) + keys * ((spec.head_dim + spec.v_head_dim) * es + rope)
            per_head += rows * keys * mask_es + once
            if mask_es:  # the launcher's block list: two counts (full, listed), the index of every visited key block
                per_head += _BLOCK_LIST_BYTES * (2 + len(self.key_blocks_per_program(m)))
        return per_head * self.grid[1]

    def _mask_bytes(self) -> int:
        spec = self._attn()
        if spec.mask == "none":
            return 0
        return 1 if spec.mask in ("boolean", "key_padding") else itemsize(spec.dtype)

    # -------------------------------------------------------------------------------------------- cost terms
    @property
    def hbm_read_bytes(self) -> int:
        """Bytes loaded by all programs (see the module docstring for the convention)."""
        spec = self.spec
        if (costs := self._multi_costs()) is not None:
            return costs.read_bytes
        if isinstance(spec, AttentionSpec):
            return self._forward_read()
        if isinstance(spec, NormSpec):
            es, width = itemsize(spec.dtype), spec.width
            per_row = width * es * (1 + self.norm_chunked + spec.residual + spec.has_weight + spec.has_bias)
            return per_row * self._rows()
        es = itemsize(spec.dtype)
        return self._rows() * (spec.head_dim * es + 2 * spec.rotary_dim * es)

    @property
    def hbm_write_bytes(self) -> int:
        spec = self.spec
        if (costs := self._multi_costs()) is not None:
            return costs.write_bytes
        if isinstance(spec, AttentionSpec):
            rows = _static("q_len", spec.q_len) * self.grid[1]
            return rows * (spec.v_head_dim * itemsize(spec.dtype) + _LSE_BYTES)
        if isinstance(spec, NormSpec):
            per_row = spec.width * itemsize(spec.out_dtype) + _STAT_BYTES * (1 if spec.norm == "rmsnorm" else 2)
            per_row += spec.width * itemsize(spec.dtype) if spec.residual else 0
            return per_row * self._rows()
        return self._rows() * spec.head_dim * itemsize(spec.dtype)

    @property
    def smem_bytes(self) -> int:
        """Shared memory one program needs: attention = Q tile + (K, V [, mask] tiles) × num_stages, padded blocks
        (backward: `plan_backward.backward_smem_bytes`); norm/RoPE hold no staged tiles (0)."""
        spec = self.spec
        if not isinstance(spec, AttentionSpec):
            return 0
        bm, bn, bd, bdv = self.blocks
        if self._backward:
            return bwd.backward_smem_bytes(self._bwd_dims(), bd, bdv, self.config.num_stages)
        es = itemsize(spec.dtype)
        staged = bn * (bd + bdv) * es + bm * bn * self._mask_bytes()
        return bm * bd * es + staged * self.config.num_stages

    @property
    def sram_bytes(self) -> int:
        """On-chip bytes per program (shared memory + register accumulators, padded blocks). Attention:
        `smem_bytes` + fp32 acc [BM, BDV] + fp32 scores/probabilities [BM, BN] + fp32 m_i, l_i [BM]; backward:
        `smem_bytes` + fp32 dK, dV [BN, BD + BDV] + fp32 P and dP [BM, BN].
        Norm: x/y rows in fp32 (2 × BLOCK × 4, + BLOCK × 4 for the residual sum). RoPE: 6 fp32 [BR, BH] operand
        tiles (x1, x2, c1, c2, s1, s2) + the tail tile in the input dtype."""
        spec = self.spec
        if isinstance(spec, AttentionSpec) and self._backward:
            bm, bn, bd, bdv = self.blocks
            return self.smem_bytes + 4 * (bn * (bd + bdv) + 2 * bm * bn)
        if isinstance(spec, AttentionSpec):
            bm, bn, _, bdv = self.blocks
            return self.smem_bytes + 4 * (bm * bdv + bm * bn + 2 * bm)
        if isinstance(spec, NormSpec):
            return 4 * self.blocks[0] * (2 + spec.residual)
        br, bh, bt = self.blocks
        return br * (6 * bh * 4 + bt * itemsize(spec.dtype))

    @property
    def flops(self) -> int:
        """Attention: 2·rows·keys·(D + Dv) over every (query row, key column) pair of the *visited* blocks that is
        in range (so block-level causal/window skipping is credited, in-block masking is not; padding never
        counts). Softmax/exp work is not counted; backward: see `plan_backward`. Norm: per element 1 (residual add)
        + 2 (square, sum) [+ 2 LayerNorm centering] + 1 (normalize) [+ 1 weight, +1 offset, +1 bias]. RoPE: 3 per
        rotated element."""
        spec = self.spec
        if (costs := self._multi_costs()) is not None:
            return costs.flops
        if isinstance(spec, AttentionSpec):
            pairs = sum(self._rows_in_block(m) * self._keys_visited(m) for m in range(self.grid[0]))
            return 2 * pairs * (spec.head_dim + spec.v_head_dim) * self.grid[1]
        if isinstance(spec, NormSpec):
            per = 3 + spec.residual + 2 * (spec.norm == "layernorm") + spec.has_weight + spec.has_bias
            per += spec.has_weight and spec.weight_offset != 0.0
            return per * spec.width * self._rows()
        return 3 * spec.rotary_dim * self._rows()

    # ----------------------------------------------------------------------------------------- feasibility
    def infeasible_reasons(self, target: dict[str, Any]) -> list[str]:
        """Why this plan cannot run on `target` ({"smem_bytes": ..., "max_head_dim": ...}); [] when it can."""
        reasons: list[str] = []
        cfg = self.config
        spec = self.spec
        if isinstance(spec, AttentionSpec):
            for name, value in (("block_m", cfg.block_m), ("block_n", cfg.block_n)):
                if value < 16 or value & (value - 1):
                    reasons.append(f"{name}={value} is not a power of two >= 16")
        elif isinstance(spec, RopeSpec) and (cfg.block_m < 1 or cfg.block_m & (cfg.block_m - 1)):
            reasons.append(f"block_m={cfg.block_m} (RoPE rows per program) is not a power of two")
        elif isinstance(spec, NormSpec):
            if cfg.block_n < 1 or cfg.block_n & (cfg.block_n - 1):
                reasons.append(f"block_n={cfg.block_n} (norm row block) is not a power of two")
            if self.kernel_family == "norm_backward" and cfg.num_splits is not None and cfg.num_splits < 1:
                reasons.append(f"num_splits={cfg.num_splits} (norm backward programs) < 1")
        if cfg.num_warps < 1 or cfg.num_warps & (cfg.num_warps - 1):
            reasons.append(f"num_warps={cfg.num_warps} is not a power of two")
        if cfg.num_stages < 1:
            reasons.append(f"num_stages={cfg.num_stages} < 1")
        max_d = int(target.get("max_head_dim", MAX_HEAD_DIM))
        if isinstance(spec, AttentionSpec) and max(spec.head_dim, spec.v_head_dim) > max_d:
            reasons.append(f"head dims {spec.head_dim}/{spec.v_head_dim} exceed max_head_dim={max_d}")
        if self._decode:
            reasons += self._decode_reasons()
        smem_limit = target.get("smem_bytes")
        if isinstance(spec, AttentionSpec) and smem_limit is not None and self.smem_bytes > int(smem_limit):
            reasons.append(f"needs {self.smem_bytes} B of shared memory, target has {smem_limit}")
        return reasons

    def _decode_reasons(self) -> list[str]:
        spec, splits = self._attn(), self.config.num_splits
        rows, limit = self._group() * _static("q_len", spec.q_len), max_decode_rows(max(spec.head_dim, spec.v_head_dim))
        reasons = [f"num_splits={splits} < 1"] if splits is not None and splits < 1 else []
        if rows > limit:
            reasons.append(f"group x q_len = {rows} rows exceed the decode tile ({limit})")
        return reasons

    def feasible(self, target: dict[str, Any]) -> bool:
        return not self.infeasible_reasons(target)


def launcher_config(spec: AttentionSpec | NormSpec | RopeSpec, family: str = "auto") -> TileConfig:
    """The knobs a launcher uses when the caller gives none, as a TileConfig (`family` as in TiledPlan)."""
    from tilefuse.codegen.attention_args import backward_config
    from tilefuse.codegen.attention_decode import decode_config
    from tilefuse.codegen.attention_fwd import default_config

    kind = TiledPlan(spec, TileConfig(), family).kernel_family
    if isinstance(spec, NormSpec):
        block = _norm.default_row_block(spec.width)
        return TileConfig(block_n=block, num_warps=_norm.default_warps(block, _norm.is_chunked(spec.width, block)))
    if isinstance(spec, RopeSpec):
        return TileConfig(block_m=_ROPE_BLOCK_ROWS, num_warps=_ROPE_WARPS)
    head_dim = max(spec.head_dim, spec.v_head_dim)
    masked, rope, dropout = spec.mask != "none", spec.rope is not None, bool(spec.dropout_p)
    if kind == "attention_decode":
        rows = _static("q_len", spec.q_len) * _static("q_heads", spec.q_heads) // _static("kv_heads", spec.kv_heads)
        block_n, warps, stages = decode_config(pow2_block(MAX_DECODE_ROWS, rows), head_dim, rope)
        return TileConfig(block_n=block_n, num_warps=warps, num_stages=stages)
    if kind == "attention_backward":
        return TileConfig(*backward_config(head_dim, masked, rope, dropout)[0])
    return TileConfig(*default_config(head_dim, masked, rope, dropout))


def kept_pairs(spec: AttentionSpec) -> int:
    """(query, key) pairs per head that causal/window keep (mask tensors are data, not counted)."""
    q_len, kv_len = _static("q_len", spec.q_len), _static("kv_len", spec.kv_len)
    offset = kv_len - q_len if spec.align == "bottom_right" else 0
    total = 0
    for i in range(q_len):
        pos = i + offset
        hi = min(kv_len, pos + 1) if spec.causal else kv_len
        lo = max(0, pos - spec.window + 1) if spec.window else 0
        total += max(0, hi - lo)
    return total


def io_lower_bound_bytes(spec: AttentionSpec, sram_bytes: int) -> int:
    """I/O lower bound of attention (Saha & Ye, "The I/O Complexity of Attention"), in bytes, constant 1:

        max(compulsory, B·Hq · P·D·Dv / M) · element_size      when M >= D·Dv
        max(compulsory, B·Hq · P·sqrt(D·Dv / M)) · element_size  when M <  D·Dv (the matmul-like regime;
                                                                  both forms agree at M = D·Dv)

    with M = sram_bytes / element_size the SRAM in elements, P = `kept_pairs(spec)` (Nq·Nk for full attention,
    fewer under causal/window: skipped pairs need no I/O), and compulsory = read Q, K, V once and write O once.
    The two terms are each a lower bound, so their max is one too (a plain sum is not: with a single query block,
    FlashAttention moves exactly the compulsory bytes). The lse and mask tensors are not part of the bound.
    """
    b, hq = _static("batch", spec.batch), _static("q_heads", spec.q_heads)
    hkv = _static("kv_heads", spec.kv_heads)
    q_len, kv_len = _static("q_len", spec.q_len), _static("kv_len", spec.kv_len)
    d, dv = spec.head_dim, spec.v_head_dim
    es = itemsize(spec.dtype)
    m_elems = max(sram_bytes / es, 1.0)
    compulsory = b * (hq * q_len * (d + dv) + hkv * kv_len * (d + dv))
    pairs = kept_pairs(spec)
    ratio = d * dv / m_elems if m_elems >= d * dv else math.sqrt(d * dv / m_elems)
    tiled = b * hq * pairs * ratio
    return int(max(compulsory, tiled) * es)
