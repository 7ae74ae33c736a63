"""The FA2 attention forward (`attention_fwd.attention_fwd_kernel`), and the terms every attention family shares.

Grid (cdiv(Nq, BLOCK_M), B·Hq). Program (m, bh) loads its Q tile once, then for every key block in
`key_blocks_per_program(m)` a K and a V tile (and a mask tile when the Spec has a mask tensor), and stores its O
rows and fp32 lse. Mask element size: 1 byte for boolean / key_padding (the launcher views bool as uint8), the
attention dtype for additive masks. RoPE adds, for the Q tile and every K tile, the partner columns and cos/sin
(rotary_dim each per row, cos/sin assumed in `spec.dtype`); dropout adds the int64 [seed, offset] rng read once per
program. With a mask tensor the kernels skip the tiles the mask keeps nothing of and read a block list instead; the
plan counts the list as if no tile is skipped and every visited tile loads the mask (an upper bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tilefuse.codegen.attention_fwd import MAX_HEAD_DIM, pow2_block, scale_in_exp
from tilefuse.codegen.attention_fwd import default_config as fwd_default
from tilefuse.codegen.kernel_variant import KernelVariant, attention_fwd_kernel
from tilefuse.codegen.launch_configs import LaunchKey, attention_key
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import AttentionSpec, kernel_mask_kind, rope_layout_code

from .base import (
    BLOCK_LIST_BYTES,
    F32_BYTES,
    RNG_BYTES,
    Costs,
    KernelFamily,
    PlanCosts,
    is_pow2,
    is_static,
    itemsize,
    knobs,
    pointer_type,
    static,
)

LSE_BYTES = F32_BYTES  # log-sum-exp is fp32
ALIBI_BYTES = F32_BYTES  # ALiBi slopes are assumed fp32 (the Spec does not record their dtype)


# ------------------------------------------------------------------------------ terms every attention family uses
def group(spec: AttentionSpec) -> int:
    """Query heads per KV head."""
    return static("q_heads", spec.q_heads) // max(static("kv_heads", spec.kv_heads), 1)


def pos_offset(spec: AttentionSpec) -> int:
    """How far query positions shift against key positions (Nk - Nq for bottom-right alignment)."""
    return static("kv_len", spec.kv_len) - static("q_len", spec.q_len) if spec.align == "bottom_right" else 0


def mask_bytes(spec: AttentionSpec) -> int:
    """Bytes per mask element the kernels load; 0 without a mask tensor."""
    if spec.mask == "none":
        return 0
    return 1 if spec.mask in ("boolean", "key_padding") else itemsize(spec.dtype)


def rope_row_bytes(spec: AttentionSpec) -> int:
    """RoPE's extra bytes per rotated row: partner columns, cos and sin (rotary_dim each, in `spec.dtype`)."""
    return 3 * spec.rope.rotary_dim * itemsize(spec.dtype) if spec.rope else 0


def launch_name(prefix: str, blocks: tuple[int, ...], config: TileConfig) -> str:
    return f"{prefix}_{blocks[0]}x{blocks[1]}_w{config.num_warps}_s{config.num_stages}"


def _strides(shape: tuple[int, ...], broadcast: tuple[bool, ...] | None = None) -> list[int]:
    """Strides of a contiguous tensor of `shape`; dims flagged in `broadcast` get stride 0 (an expanded view)."""
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return [0 if b else s for s, b in zip(strides, broadcast, strict=True)] if broadcast else strides


def _expanded(shape: tuple[int, ...], full: tuple[int, ...]) -> list[int]:
    """Strides of a contiguous tensor of `shape` expanded to `full` as the launchers do (Tensor.expand): stride 0
    only where a dim of size 1 grows; a size-1 dim that stays 1 keeps its stride."""
    return _strides(shape, tuple(s == 1 and f != 1 for s, f in zip(shape, full, strict=True)))


def _named(names: str, strides: list[int]) -> dict[str, int]:
    return {f"stride_{n}": s for n, s in zip(names.split(), strides, strict=True)}


def attention_ints(spec: AttentionSpec) -> dict[str, int]:
    """The integer arguments of a launch on contiguous tensors (so a compile sees the launch's divisibility)."""
    b, hq, hkv = int(spec.batch or 1), int(spec.q_heads or 1), int(spec.kv_heads or 1)
    nq, nk, d, dv = int(spec.q_len or 1), int(spec.kv_len or 1), spec.head_dim, spec.v_head_dim
    ints = {
        **_named("qb qh qm qd", _strides((b, hq, nq, d))),
        **_named("kb kh kn kd", _strides((b, hkv, nk, d))),
        **_named("vb vh vn vd", _strides((b, hkv, nk, dv))),
        **_named("ob oh om od", _strides((b, hq, nq, dv))),
        "num_q_heads": hq, "group": spec.gqa_group, "q_len": nq, "kv_len": nk, "head_dim": d, "head_dim_v": dv,
        "rotary_dim": spec.rope.rotary_dim if spec.rope else 0, "window": spec.window or 0,
        "pos_offset": nk - nq if spec.align == "bottom_right" else 0,
    }  # fmt: skip
    if spec.mask != "none":
        ints.update(_named("mb mh mm mn", _expanded(mask_dims(spec), (b, hq, nq, nk))))
    if spec.rope:  # an [N, rotary_dim] table broadcast over batch and heads; [1, rotary_dim] when Nq != Nk (the
        # only table reference.rope_qk broadcasts to both q and k then, e.g. decode)
        rows = nq if nq == nk else 1
        table = _expanded((1, 1, rows, spec.rope.rotary_dim), (b, hq, nq, spec.rope.rotary_dim))
        ints.update(_named("cb ch cn cd", table) | _named("sb sh sn sd", table))
    return ints


def mask_dims(spec: AttentionSpec) -> tuple[int, ...]:
    """The Spec's mask shape left-padded to 4 dims [B, H, Nq, Nk] (no shape recorded: a full mask)."""
    b, hq, nq, nk = (int(d or 1) for d in (spec.batch, spec.q_heads, spec.q_len, spec.kv_len))
    shape = tuple(int(s or 1) for s in spec.mask_shape) or (b, hq, nq, nk)
    return (1,) * (4 - len(shape)) + shape


def block_list_ints(spec: AttentionSpec, block_m: int, block_n: int, by_key: bool = False) -> dict[str, int]:
    """Strides of the block list the launchers pass with a mask tensor (`attention_args.mask_block_list`: index
    [Bm, Hm, outer, inner] and counts [Bm, Hm, outer, 2], contiguous, stride 0 where a dim has size 1). Outer blocks
    are query blocks, one shared by all of them when neither the mask's rows nor causal/window depend on the query
    block; by_key (the dK/dV kernel's list): key blocks, each listing query blocks. {} without a mask tensor."""
    if spec.mask == "none":
        return {}
    mask_b, mask_h, mask_rows = mask_dims(spec)[:3]
    q_blocks = -(-static("q_len", spec.q_len) // block_m)
    kv_blocks = -(-static("kv_len", spec.kv_len) // block_n)
    shared = mask_rows == 1 and not (spec.causal or spec.window)
    outer, inner = (kv_blocks, q_blocks) if by_key else (1 if shared else q_blocks, kv_blocks)
    broadcast = (mask_b == 1, mask_h == 1, outer == 1)
    index = _strides((mask_b, mask_h, outer, inner), (*broadcast, False))[:3]
    count = _strides((mask_b, mask_h, outer, 2), (*broadcast, False))[:3]
    return _named("ib ih im", index) | _named("nb nh nm", count)


def attention_consts(spec: AttentionSpec, blocks: tuple[int, ...]) -> dict[str, Any]:
    """The constexprs every attention kernel (forward, decode, backward) takes, as its launcher sets them."""
    block_m, block_n, block_d, block_dv = blocks
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=spec.causal,
        USE_WINDOW=bool(spec.window), MASK_KIND=kernel_mask_kind(spec.mask),
        HAS_SOFTCAP=bool(spec.softcap), HAS_ALIBI=spec.alibi,
        INPUT_PRECISION="ieee" if spec.dtype.endswith("float32") else "tf32", UPCAST_DOT=False,
        ROPE_LAYOUT=rope_layout_code(spec.rope.layout if spec.rope else None), HAS_DROPOUT=spec.dropout_p > 0,
        SKIP_TILES=spec.mask != "none",  # the launchers pass a mask's block list with every mask tensor
    )  # fmt: skip


def attention_pointers(spec: AttentionSpec, names: str, fp32: str = "") -> dict[str, str]:
    """Pointer types: `names` in the Spec's dtype, `fp32` names fp32, plus the optional inputs (mask, ALiBi slopes,
    cos/sin, the dropout rng, the mask's block list)."""
    pointers = {name: pointer_type(spec.dtype) for name in (*names.split(), "Cos", "Sin")}
    pointers |= {name: "*fp32" for name in (*fp32.split(), "Alibi")}
    pointers |= {"Mask": pointer_type(spec.dtype) if spec.mask == "additive" else "*u8", "Rng": "*i64"}
    pointers |= {name: "*i32" for name in ("BlockIdx", "BlockCount", "BlockPrefix")}
    return pointers


def shape_free_default(spec: AttentionSpec) -> TileConfig:
    """The FA2 forward's default for a Spec with dynamic dims (no shape to pick a kernel by; dropout not read)."""
    head_dim = max(spec.head_dim, spec.v_head_dim)
    return TileConfig(*fwd_default(head_dim, spec.mask != "none", spec.rope is not None))


# ------------------------------------------------------------------------------------------------ the family
class AttentionFamily(KernelFamily[AttentionSpec]):
    """The FA2 forward; the decode and backward families derive from it (same blocks, key ranges and limits)."""

    name = "attention"
    spec_type = AttentionSpec
    kernel_source = ("tilefuse.codegen.attention_fwd", "attention_fwd_kernel")
    # Every block a power of two that tl.dot accepts.
    choices = knobs(block_m=(16, 32, 64, 128, 256), block_n=(16, 32, 64, 128), num_warps=(2, 4, 8),
               num_stages=(1, 2, 3, 4))  # fmt: skip

    def default_config(self, spec: AttentionSpec) -> TileConfig:
        return self.launcher_default(spec) if is_static(spec) else shape_free_default(spec)

    def launcher_default(self, spec: AttentionSpec) -> TileConfig:
        """The launcher's default for a static Spec."""
        masked, rope, dropout = spec.mask != "none", spec.rope is not None, bool(spec.dropout_p)
        return TileConfig(*fwd_default(max(spec.head_dim, spec.v_head_dim), masked, rope, dropout))

    def blocks(self, spec: AttentionSpec, config: TileConfig) -> tuple[int, ...]:
        """(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV) the launcher really uses."""
        return self.padded_blocks(spec, config, config.block_m, static("q_len", spec.q_len))

    @staticmethod
    def padded_blocks(spec: AttentionSpec, config: TileConfig, block_m: int, rows: int) -> tuple[int, ...]:
        return (
            pow2_block(block_m, rows),
            pow2_block(config.block_n, static("kv_len", spec.kv_len)),
            pow2_block(MAX_HEAD_DIM, spec.head_dim),
            pow2_block(MAX_HEAD_DIM, spec.v_head_dim),
        )

    def grid(self, spec: AttentionSpec, config: TileConfig) -> tuple[int, ...]:
        heads = static("batch", spec.batch) * static("q_heads", spec.q_heads)
        return (-(-static("q_len", spec.q_len) // self.blocks(spec, config)[0]), heads)

    def key_blocks_per_program(self, spec: AttentionSpec, config: TileConfig, m: int) -> range:
        """Start columns of the key blocks query block `m` visits, exactly the kernel's `range(lo, hi, BLOCK_N)`:
        causal stops after the block holding the last row's position; a window starts at the block holding
        `first_pos - window + 1` (floored to BLOCK_N); positions shift by Nk - Nq for bottom-right alignment."""
        q_len, kv_len = static("q_len", spec.q_len), static("kv_len", spec.kv_len)
        block_m, block_n = self.blocks(spec, config)[:2]
        offset = pos_offset(spec)
        lo, hi = 0, kv_len
        if spec.causal:
            hi = min(hi, min(m * block_m + block_m, q_len) + offset)
        if spec.window:
            lo = max(m * block_m + offset - spec.window + 1, 0) // block_n * block_n
        return range(lo, hi, block_n)

    def _rows_in_block(self, spec: AttentionSpec, config: TileConfig, m: int) -> int:
        block_m = self.blocks(spec, config)[0]
        return max(0, min(block_m, static("q_len", spec.q_len) - m * block_m))

    def _keys_visited(self, spec: AttentionSpec, config: TileConfig, m: int) -> int:
        """Valid (in-range) key columns over all key blocks query block m loads."""
        starts = self.key_blocks_per_program(spec, config, m)
        if len(starts) == 0:
            return 0
        return min(starts[-1] + self.blocks(spec, config)[1], static("kv_len", spec.kv_len)) - starts[0]

    def costs(self, spec: AttentionSpec, config: TileConfig) -> PlanCosts:
        """Reads: per query block its Q tile (+ RoPE), every visited K/V tile (+ RoPE, mask tile), the ALiBi slope,
        the rng, and the mask's block list; times B·Hq. Writes: O rows and the fp32 lse. FLOPs: 2·rows·keys·(D + Dv)
        over every (query row, key column) pair of the *visited* blocks that is in range (block-level causal/window
        skipping is credited, in-block masking is not; padding never counts; softmax work is not counted)."""
        es, mask_es, rope = itemsize(spec.dtype), mask_bytes(spec), rope_row_bytes(spec)
        once = (ALIBI_BYTES if spec.alibi else 0) + (RNG_BYTES if spec.dropout_p > 0 else 0)
        blocks_m, heads = self.grid(spec, config)
        per_head = pairs = 0
        for m in range(blocks_m):
            rows, keys = self._rows_in_block(spec, config, m), self._keys_visited(spec, config, m)
            per_head += rows * (spec.head_dim * es + rope) + keys * ((spec.head_dim + spec.v_head_dim) * es + rope)
            per_head += rows * keys * mask_es + once
            if mask_es:  # the launcher's block list: two counts (full, listed), the index of every visited key block
                per_head += BLOCK_LIST_BYTES * (2 + len(self.key_blocks_per_program(spec, config, m)))
            pairs += rows * keys
        write = static("q_len", spec.q_len) * heads * (spec.v_head_dim * es + LSE_BYTES)
        return Costs(per_head * heads, write, 2 * pairs * (spec.head_dim + spec.v_head_dim) * heads)

    def smem_bytes(self, spec: AttentionSpec, config: TileConfig) -> int:
        """Q tile + (K, V [, mask] tiles) × num_stages, padded blocks."""
        bm, bn, bd, bdv = self.blocks(spec, config)
        es = itemsize(spec.dtype)
        staged = bn * (bd + bdv) * es + bm * bn * mask_bytes(spec)
        return bm * bd * es + staged * config.num_stages

    def sram_bytes(self, spec: AttentionSpec, config: TileConfig) -> int:
        """`smem_bytes` + fp32 acc [BM, BDV] + fp32 scores/probabilities [BM, BN] + fp32 m_i, l_i [BM]."""
        bm, bn, _, bdv = self.blocks(spec, config)
        return self.smem_bytes(spec, config) + 4 * (bm * bdv + bm * bn + 2 * bm)

    def knob_reasons(self, spec: AttentionSpec, config: TileConfig) -> list[str]:
        return [f"{name}={value} is not a power of two >= 16"
                for name, value in (("block_m", config.block_m), ("block_n", config.block_n))
                if not is_pow2(value, 16)]  # fmt: skip

    def target_reasons(self, spec: AttentionSpec, config: TileConfig, target: Mapping[str, Any]) -> list[str]:
        reasons = []
        max_d = int(target.get("max_head_dim", MAX_HEAD_DIM))
        if max(spec.head_dim, spec.v_head_dim) > max_d:
            reasons.append(f"head dims {spec.head_dim}/{spec.v_head_dim} exceed max_head_dim={max_d}")
        reasons += self.tile_reasons(spec, config)
        smem_limit, smem = target.get("smem_bytes"), self.smem_bytes(spec, config)
        if smem_limit is not None and smem > int(smem_limit):
            reasons.append(f"needs {smem} B of shared memory, target has {smem_limit}")
        return reasons

    def tile_reasons(self, spec: AttentionSpec, config: TileConfig) -> list[str]:
        """Why the family's tile cannot hold the problem (decode: the group's rows); []: it can."""
        return []

    def duplicate_reasons(self, spec: AttentionSpec, config: TileConfig) -> list[str]:
        blocks = self.blocks(spec, config)
        if blocks[:2] != (config.block_m, config.block_n):
            return [f"blocks {config.block_m}x{config.block_n} shrink to {blocks[0]}x{blocks[1]}"]
        return []

    def variants(self, spec: AttentionSpec, config: TileConfig) -> tuple[KernelVariant, ...]:
        blocks = self.blocks(spec, config)
        consts = attention_consts(spec, blocks)
        consts["SCALE_IN_EXP"] = scale_in_exp(spec.scale, spec.softcap or 0.0, spec.alibi, consts["MASK_KIND"])
        ints = attention_ints(spec) | block_list_ints(spec, blocks[0], blocks[1])
        name = f"attention_fwd_d{spec.head_dim}{'_mask' if spec.mask != 'none' else ''}{'_rope' if spec.rope else ''}"
        return (KernelVariant(
            launch_name(name, blocks, config), attention_fwd_kernel, attention_pointers(spec, "Q K V Out", "Lse"),
            ("qk_scale", "softcap_log2"), consts, config.num_warps, config.num_stages, ints,
        ),)  # fmt: skip

    def launch_key(self, spec: AttentionSpec) -> LaunchKey | None:
        return attention_key(
            self.name, spec.head_dim, spec.v_head_dim, spec.dtype, spec.gqa_group, spec.q_len, spec.kv_len,
            spec.causal, bool(spec.window), bool(spec.softcap), spec.alibi, spec.mask != "none",
            spec.rope is not None, spec.dropout_p > 0,
        )  # fmt: skip


ATTENTION = AttentionFamily()
