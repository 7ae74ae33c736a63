"""Split-KV attention decode (`attention_decode.py`), picked by the dispatcher for decode shapes (`use_decode`).

Phase 1 grid (num_splits, B·Hkv): a working split loads the group's Q rows (group·Nq), its key blocks' K, V (and
mask, ALiBi, RoPE partner + cos/sin in `spec.dtype`; with a mask two prefix counts and an index entry per key
block) and stores fp32 partial rows (Dv + 1 values each); splits past the visible range move nothing. Phase 2 (one
program per query row, `combine_grid`) loads the working splits' partials and stores O and lse.
"""

from __future__ import annotations

import triton

from tilefuse.codegen.attention_decode import (
    COMBINE_WARPS,
    MAX_DECODE_ROWS,
    SplitLayout,
    decode_config,
    max_decode_rows,
    split_layout,
    use_decode,
)
from tilefuse.codegen.attention_fwd import pow2_block
from tilefuse.codegen.kernel_variant import KernelVariant, decode_combine_kernel, decode_split_kernel
from tilefuse.codegen.reference import AttnFlags
from tilefuse.codegen.tile_config import HEURISTIC_SPLITS, TileConfig
from tilefuse.specs import AttentionSpec

from .attention import (
    ALIBI_BYTES,
    LSE_BYTES,
    AttentionFamily,
    attention_consts,
    attention_ints,
    attention_pointers,
    group,
    launch_name,
    mask_bytes,
    mask_dims,
    rope_row_bytes,
)
from .base import BLOCK_LIST_BYTES, F32_BYTES, RNG_BYTES, Costs, PlanCosts, is_static, itemsize, knobs, static

SCRATCH_BYTES = F32_BYTES  # split-KV partial outputs and log2-sum-exps are fp32


class DecodeFamily(AttentionFamily):
    """One tile holds every query row of a GQA group; block_m is not read, num_splits is."""

    name = "attention_decode"
    kernel_source = ("tilefuse.codegen.attention_decode", "attention_decode_split_kernel")
    # Rows are fixed by the GQA group; the key block, warps, stages and the split count vary.
    choices = knobs(block_n=(16, 32, 64, 128), num_warps=(2, 4, 8), num_stages=(1, 2, 3, 4),
               num_splits=(HEURISTIC_SPLITS, 4, 8, 16, 32, 64, 128))  # fmt: skip

    def dispatches(self, spec: AttentionSpec) -> bool:
        if not is_static(spec):
            return False
        q_len, kv_len = static("q_len", spec.q_len), static("kv_len", spec.kv_len)
        return use_decode(q_len, kv_len, group(spec), max(spec.head_dim, spec.v_head_dim))

    def launcher_default(self, spec: AttentionSpec) -> TileConfig:
        rows = static("q_len", spec.q_len) * static("q_heads", spec.q_heads) // static("kv_heads", spec.kv_heads)
        head_dim = max(spec.head_dim, spec.v_head_dim)
        block_n, warps, stages = decode_config(pow2_block(MAX_DECODE_ROWS, rows), head_dim, spec.rope is not None)
        return TileConfig(block_n=block_n, num_warps=warps, num_stages=stages)

    def blocks(self, spec: AttentionSpec, config: TileConfig) -> tuple[int, ...]:
        rows = static("q_len", spec.q_len) * group(spec)
        return self.padded_blocks(spec, config, MAX_DECODE_ROWS, rows)

    def decode_layout(self, spec: AttentionSpec, config: TileConfig) -> SplitLayout:
        """The decode launcher's cut of the visible key range into splits (`attention_decode.split_layout`)."""
        flags = AttnFlags.from_spec(spec)
        programs = static("batch", spec.batch) * static("kv_heads", spec.kv_heads)
        q_len, kv_len = static("q_len", spec.q_len), static("kv_len", spec.kv_len)
        return split_layout(q_len, kv_len, self.blocks(spec, config)[1], flags, programs, config.num_splits)

    def grid(self, spec: AttentionSpec, config: TileConfig) -> tuple[int, ...]:
        programs = static("batch", spec.batch) * static("kv_heads", spec.kv_heads)
        return (self.decode_layout(spec, config).num_splits, programs)

    def combine_grid(self, spec: AttentionSpec) -> tuple[int, ...]:
        """Grid of phase 2: one program per query row."""
        return (static("batch", spec.batch) * static("q_heads", spec.q_heads) * static("q_len", spec.q_len),)

    def costs(self, spec: AttentionSpec, config: TileConfig) -> PlanCosts:
        """Bytes and FLOPs of both phases: phase 1 summed over the working splits of one (batch, kv head) and
        scaled by B·Hkv, phase 2 per query row (it reads the working splits' partials)."""
        es, d, dv, bn = itemsize(spec.dtype), spec.head_dim, spec.v_head_dim, self.blocks(spec, config)[1]
        layout, (splits, programs) = self.decode_layout(spec, config), self.grid(spec, config)
        kv_len, rows = static("kv_len", spec.kv_len), group(spec) * static("q_len", spec.q_len)
        mask_es = mask_bytes(spec)
        per_row = d * es + (ALIBI_BYTES if spec.alibi else 0) + rope_row_bytes(spec)
        per_key = (d + dv) * es + rope_row_bytes(spec)
        read = write = pairs = 0
        for split in range(layout.work_splits):
            lo = layout.vis_lo + split * layout.split_len
            last = range(lo, min(lo + layout.split_len, layout.vis_hi), bn)[-1]
            keys = min(last + bn, kv_len) - lo
            read += rows * per_row + keys * per_key + rows * keys * mask_es
            if mask_es:  # the kept-block list: prefix counts at both ends, an index per key block
                read += BLOCK_LIST_BYTES * (2 + (last - lo) // bn + 1)
            write += rows * (dv + 1) * SCRATCH_BYTES
            pairs += rows * keys
        read = read * programs + (RNG_BYTES * splits * programs if spec.dropout_p > 0 else 0)
        q_rows = self.combine_grid(spec)[0]
        read += q_rows * layout.work_splits * (dv + 1) * SCRATCH_BYTES
        write = write * programs + q_rows * (dv * es + LSE_BYTES)
        return Costs(read, write, 2 * pairs * (d + dv) * programs)

    def tile_reasons(self, spec: AttentionSpec, config: TileConfig) -> list[str]:
        splits = config.num_splits
        rows, limit = group(spec) * static("q_len", spec.q_len), max_decode_rows(max(spec.head_dim, spec.v_head_dim))
        reasons = [f"num_splits={splits} < 1"] if splits is not None and splits < 1 else []
        if rows > limit:
            reasons.append(f"group x q_len = {rows} rows exceed the decode tile ({limit})")
        return reasons

    def duplicate_reasons(self, spec: AttentionSpec, config: TileConfig) -> list[str]:
        block_n = self.blocks(spec, config)[1]
        if block_n != config.block_n:
            return [f"block_n={config.block_n} shrinks to {block_n}"]
        layout = self.decode_layout(spec, config)
        if config.num_splits is not None and layout.work_splits < config.num_splits:
            return [f"num_splits={config.num_splits}: only {layout.work_splits} splits have key blocks"]
        return []

    def variants(self, spec: AttentionSpec, config: TileConfig) -> tuple[KernelVariant, ...]:
        """Phase 1 (the split kernel; phase 2 is a fixed, small combine) at the plan's split layout."""
        layout, blocks = self.decode_layout(spec, config), self.blocks(spec, config)
        ints = attention_ints(spec) | {"kv_heads": int(spec.kv_heads or 1)} | layout._asdict()
        ints |= self.kept_blocks_ints(spec, blocks[1])
        floats = ("qk_scale", "softcap_log2", "drop_p", "drop_scale")
        name = launch_name(f"attention_decode_d{spec.head_dim}", blocks, config) + f"_splits{layout.num_splits}"
        return (KernelVariant(
            name, decode_split_kernel, attention_pointers(spec, "Q K V", "Acc Stat"), floats,
            attention_consts(spec, blocks), config.num_warps, config.num_stages, ints,
        ),)  # fmt: skip

    @staticmethod
    def kept_blocks_ints(spec: AttentionSpec, block_n: int) -> dict[str, int]:
        """Strides of the kept-block list the launcher passes with a mask tensor (`attention_args.mask_kept_blocks`:
        index [Bm, Hkv or 1, key blocks] and prefix [Bm, Hkv or 1, key blocks + 1], stride 0 on size-1 dims)."""
        if spec.mask == "none":
            return {}
        mask_b, mask_h = mask_dims(spec)[:2]
        heads = int(spec.kv_heads or 1) if mask_h > 1 else 1
        kv_blocks = -(-static("kv_len", spec.kv_len) // block_n)
        ints: dict[str, int] = {}
        for names, inner in (("ib ih", kv_blocks), ("pb ph", kv_blocks + 1)):
            strides = (heads * inner if mask_b > 1 else 0, inner if heads > 1 else 0)
            ints |= {f"stride_{n}": stride for n, stride in zip(names.split(), strides, strict=True)}
        return ints

    def combine_variant(self, spec: AttentionSpec, config: TileConfig) -> KernelVariant:
        """Phase 2 (one program per query row) after a phase 1 at `config`: BLOCK_S covers its split count."""
        layout, blocks = self.decode_layout(spec, config), self.blocks(spec, config)
        ints = {k: v for k, v in attention_ints(spec).items() if k.startswith("stride_o")}
        ints |= dict(num_q_heads=int(spec.q_heads or 1), q_len=int(spec.q_len or 1), head_dim_v=spec.v_head_dim,
                     num_splits=layout.num_splits, work_splits=layout.work_splits)  # fmt: skip
        pointers = attention_pointers(spec, "Out", "Acc Stat Lse")
        consts = dict(BLOCK_S=triton.next_power_of_2(layout.num_splits), BLOCK_DV=blocks[3])
        name = f"attention_decode_combine_d{spec.head_dim}_splits{layout.num_splits}"
        return KernelVariant(name, decode_combine_kernel, pointers, (), consts, COMBINE_WARPS, ints=ints)

    def checked_variants(self, spec: AttentionSpec, config: TileConfig) -> tuple[KernelVariant, ...]:
        return (*self.variants(spec, config), self.combine_variant(spec, config))


DECODE = DecodeFamily()
