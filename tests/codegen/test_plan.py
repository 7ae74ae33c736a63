"""TiledPlan byte predictions equal the bytes the Triton kernels really move (counted under the interpreter)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed; the Triton kernels cannot run")

from triton.runtime import interpreter

from tilefuse.codegen import reference as ref
from tilefuse.codegen.attention_bwd import attention_backward_triton
from tilefuse.codegen.attention_decode import attention_decode_triton
from tilefuse.codegen.attention_fwd import attention_forward_triton
from tilefuse.codegen.families import default_config
from tilefuse.codegen.io_count import count_io
from tilefuse.codegen.norm_kernels import norm_backward_triton, norm_forward_triton
from tilefuse.codegen.plan import TiledPlan, io_lower_bound_bytes, kept_pairs
from tilefuse.codegen.rope_kernels import rope_forward_triton
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="byte counting needs the interpreter")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# name: (batch, q_heads, kv_heads, Nq, Nk, D, Dv, dtype, flags, mask kind)
ATTN_CASES: dict[str, tuple[Any, ...]] = {
    "plain": (2, 2, 2, 33, 40, 16, 16, torch.float32, {}, "none"),
    "causal_top_left": (1, 2, 2, 40, 40, 24, 24, torch.float32, {"causal": True}, "none"),
    "causal_bottom_right": (1, 2, 2, 20, 45, 16, 16, torch.float16, {"causal": True, "bottom_right": True}, "none"),
    "bottom_right_nq_gt_nk": (1, 1, 1, 37, 20, 16, 16, torch.float32, {"causal": True, "bottom_right": True}, "none"),
    "window": (1, 2, 2, 50, 50, 16, 16, torch.float32, {"window": 7, "causal": True}, "none"),
    "key_padding": (2, 2, 2, 17, 35, 16, 16, torch.float32, {}, "key_padding"),
    "additive_mask": (1, 2, 2, 19, 23, 16, 16, torch.float16, {}, "additive"),
    "gqa": (1, 4, 1, 21, 30, 40, 24, torch.float32, {"causal": True}, "none"),
}
# name: (ATTN_CASES entry, extras of `_attention_case`)
ATTN_EXTRA_CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "rope": ("plain", ("rope",)),
    "dropout": ("causal_bottom_right", ("dropout",)),
    "gqa_rope_dropout_alibi": ("gqa", ("rope", "dropout", "alibi")),
    "key_padding_rope": ("key_padding", ("rope",)),
}
CONFIGS = [TileConfig(16, 16), TileConfig(16, 32)]


def _attention_case(
    case: tuple[Any, ...], extras: frozenset[str] = frozenset()
) -> tuple[AttentionSpec, ref.AttnInputs, ref.AttnFlags]:
    """Inputs and Spec of one case; extras may add "alibi" slopes, a "rope" table ([1, D], shared by q and k rows)
    and "dropout" (p = 0.3)."""
    b, hq, hkv, nq, nk, d, dv, dtype, flag_kw, mask_kind = case
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, nk, dv, generator=gen).to(dtype)
    mask = None
    if mask_kind == "key_padding":
        # no 16-key tile is fully masked (the kernels would skip it) nor fully kept (they would not load its mask
        # tile): the plan predicts neither
        mask = torch.arange(nk)[None, None, None, :] < torch.tensor([nk, nk - 2])[:, None, None, None]
        mask &= torch.arange(nk) % 16 != 7
    elif mask_kind == "additive":
        mask = torch.randn(1, hq, nq, nk, generator=gen).to(dtype)
    flags = ref.AttnFlags(scale=d**-0.5, **flag_kw)
    inputs = ref.AttnInputs(q, k, v, mask=mask)
    if "alibi" in extras:
        inputs = inputs._replace(alibi_slopes=torch.rand(hq, generator=gen))
    if "rope" in extras:
        cos, sin = torch.rand(2, 1, d, generator=gen).to(dtype)
        inputs = inputs._replace(cos=cos, sin=sin)
        flags = flags._replace(rope_layout=ref.ROPE_ROTATE_HALF, rotary_dim=d)
    if "dropout" in extras:
        inputs, flags = inputs._replace(rng=torch.tensor([7, 0])), flags._replace(dropout_p=0.3)
    rope = RopeSpec("rotate_half", d, d, dtype=_DTYPE_NAMES[dtype]) if "rope" in extras else None
    spec = AttentionSpec(
        batch=b, q_heads=hq, kv_heads=hkv, q_len=nq, kv_len=nk, head_dim=d, v_head_dim=dv,
        dtype=_DTYPE_NAMES[dtype], scale=flags.scale, causal=flags.causal,
        align="bottom_right" if flags.bottom_right else "top_left", window=flags.window or None,
        alibi="alibi" in extras, mask=mask_kind, mask_shape=tuple(mask.shape) if mask is not None else (),
        gqa_group=hq // hkv, dropout_p=flags.dropout_p, rope=rope,
    )  # fmt: skip
    return spec, inputs, flags


def _close(predicted: int, counted: int) -> bool:
    return abs(predicted - counted) <= 0.01 * max(counted, 1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}")
@pytest.mark.parametrize("case", list(ATTN_CASES) + list(ATTN_EXTRA_CASES))
def test_attention_plan_bytes_match_kernel(case: str, config: TileConfig) -> None:
    base, extras = ATTN_EXTRA_CASES.get(case, (case, ()))
    spec, inputs, flags = _attention_case(ATTN_CASES[base], frozenset(extras))
    plan = TiledPlan(spec, config)
    with count_io() as io:
        attention_forward_triton(inputs, flags, block_m=config.block_m, block_n=config.block_n)
    assert _close(plan.hbm_read_bytes, io.read_bytes), (plan.hbm_read_bytes, io.read_bytes)
    assert _close(plan.hbm_write_bytes, io.write_bytes), (plan.hbm_write_bytes, io.write_bytes)
    assert plan.grid[1] == spec.batch * spec.q_heads  # type: ignore[operator]
    bound = io_lower_bound_bytes(spec, plan.sram_bytes)
    assert 0 < bound <= plan.hbm_read_bytes + plan.hbm_write_bytes
    assert plan.flops > 0 and plan.feasible({"smem_bytes": 228 * 1024, "max_head_dim": 256})


def test_forward_rope_and_dropout_bytes() -> None:
    """RoPE adds 3 · rotary_dim elements per loaded Q or K row (partner, cos, sin); dropout 16 B per program."""
    spec, _, _ = _attention_case(ATTN_CASES["plain"])  # one query block and one 64-key block per program
    plain = TiledPlan(spec, TileConfig(64, 64))
    rope = TiledPlan(_attention_case(ATTN_CASES["plain"], frozenset({"rope"}))[0], TileConfig(64, 64))
    drop = TiledPlan(dataclasses.replace(spec, dropout_p=0.1), TileConfig(64, 64))
    assert rope.hbm_read_bytes - plain.hbm_read_bytes == 4 * (33 + 40) * 3 * 16 * 4
    assert drop.hbm_read_bytes - plain.hbm_read_bytes == 4 * 16


# name: (ATTN_CASES entry, extras)
BWD_CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "plain": ("plain", ()),
    "causal": ("causal_top_left", ()),
    "causal_bottom_right_fp16": ("causal_bottom_right", ()),
    "bottom_right_nq_gt_nk": ("bottom_right_nq_gt_nk", ()),
    "window": ("window", ()),
    "gqa": ("gqa", ()),
    "key_padding": ("key_padding", ()),
    "additive_alibi": ("additive_mask", ("alibi",)),
    "rope": ("plain", ("rope",)),
    "gqa_rope_dropout": ("gqa", ("rope", "dropout")),
}
BWD_CONFIGS = [TileConfig(16, 16), TileConfig(32, 16)]


@pytest.mark.parametrize("config", BWD_CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}")
@pytest.mark.parametrize("case", list(BWD_CASES))
def test_backward_plan_bytes_match_kernel(case: str, config: TileConfig) -> None:
    """Preprocess + dK/dV + dQ kernels: plan bytes equal the counted bytes (the forward runs outside the count)."""
    base, extras = BWD_CASES[case]
    spec, inputs, flags = _attention_case(ATTN_CASES[base], frozenset(extras))
    out, lse = attention_forward_triton(inputs, flags)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    plan = TiledPlan(spec, config, family="attention_backward")
    with count_io() as io:
        attention_backward_triton(grad, inputs, flags, out, lse, block_m=config.block_m, block_n=config.block_n)
    assert _close(plan.hbm_read_bytes, io.read_bytes), (plan.hbm_read_bytes, io.read_bytes)
    assert _close(plan.hbm_write_bytes, io.write_bytes), (plan.hbm_write_bytes, io.write_bytes)
    costs = plan.backward_costs()
    assert plan.grid == costs.dkdv_grid and costs.dkdv_grid[1] == spec.batch * spec.kv_heads  # type: ignore[operator]
    assert costs.dq_grid == costs.preprocess_grid == (-(-spec.q_len // plan.blocks[0]), spec.batch * spec.q_heads)  # type: ignore[operator]
    assert plan.flops > 0 and plan.sram_bytes > plan.smem_bytes > 0
    assert plan.feasible({"smem_bytes": 228 * 1024, "max_head_dim": 256})


def test_backward_family_structure() -> None:
    """The backward family is only picked explicitly; its bytes exceed the forward's (it re-reads Q, K, V)."""
    spec = AttentionSpec(2, 8, 2, 256, 256, 64, 64, "bfloat16", 0.125, causal=True)
    fwd = TiledPlan(spec, TileConfig(64, 64))
    bwd = TiledPlan(spec, TileConfig(64, 64), family="attention_backward")
    assert fwd.kernel_family == "attention" and bwd.kernel_family == "attention_backward"
    assert bwd.grid == (4, 4) and bwd.backward_costs().dq_grid == (4, 16)
    assert bwd.hbm_read_bytes > fwd.hbm_read_bytes and bwd.flops > 2 * fwd.flops
    with pytest.raises(TypeError, match="backward"):
        fwd.backward_costs()


def test_fully_masked_key_tiles_are_not_loaded() -> None:
    """Batch 1 keeps 3 of 35 keys: its programs read one key tile of three, so the count falls below the plan by
    exactly the skipped K/V/mask tiles and their index entries."""
    spec, inputs, flags = _attention_case(ATTN_CASES["key_padding"])
    padded = torch.arange(35)[None, None, None, :] < torch.tensor([35, 3])[:, None, None, None]
    padded &= torch.arange(35) % 16 != 7  # no tile fully kept (test_full_tiles_load_no_mask_tile)
    plan = TiledPlan(spec, TileConfig(16, 16))
    with count_io() as io:
        out, _ = attention_forward_triton(inputs._replace(mask=padded), flags, block_m=16, block_n=16)
    golden = ref.attention_forward(inputs._replace(mask=padded), flags)
    assert torch.allclose(out, golden, atol=1e-5)
    heads, rows, skipped_keys = 2, 16 + 1, 35 - 16  # batch 1: 2 heads x 2 query blocks skip tiles 16-31, 32-34
    programs = heads * 2
    kv_bytes = programs * skipped_keys * 16 * 4 * 2  # K and V rows, fp32, D = 16
    mask_bytes = heads * rows * skipped_keys  # one byte per (row, key)
    index_bytes = programs * 2 * 4  # two int32 index entries fewer per program
    expected = plan.hbm_read_bytes - kv_bytes - mask_bytes - index_bytes
    assert io.read_bytes == expected, (io.read_bytes, expected)


def test_full_tiles_load_no_mask_tile() -> None:
    """Batch 0 keeps every key, batch 1 all but the last two: key blocks 0-15 and 16-31 are full in both (the
    partial 32-34 block still loads its mask), so the count falls below the plan by exactly those tiles' mask bytes
    (bool: one byte per pair), forward and backward (the dK/dV kernel takes only query blocks of real rows as
    full: not the one-row block at 16)."""
    spec, inputs, flags = _attention_case(ATTN_CASES["key_padding"])
    kept = torch.arange(35)[None, None, None, :] < torch.tensor([35, 33])[:, None, None, None]
    inputs = inputs._replace(mask=kept)
    full_pairs = 2 * 2 * 17 * 32  # batches x heads x rows x keys of the full tiles
    with count_io() as io:
        out, lse = attention_forward_triton(inputs, flags, block_m=16, block_n=16)
    assert io.read_bytes == TiledPlan(spec, TileConfig(16, 16)).hbm_read_bytes - full_pairs
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    with count_io() as io:
        attention_backward_triton(grad, inputs, flags, out, lse, block_m=16, block_n=16)
    plan = TiledPlan(spec, TileConfig(16, 16), family="attention_backward")
    assert io.read_bytes == plan.hbm_read_bytes - full_pairs - 2 * 2 * 16 * 32  # the dQ and the dK/dV kernel


# name: (case as in ATTN_CASES, extras, num_splits (None: the launcher's heuristic), block_n)
DECODE_CASES: dict[str, tuple[Any, ...]] = {
    "plain": ((2, 4, 2, 1, 70, 16, 16, torch.float32, {}, "none"), (), 3, 16),
    "gqa_causal_bottom_right": ((1, 8, 2, 3, 50, 24, 16, torch.float16, {"causal": True, "bottom_right": True}, "none"),
                                (), None, 16),
    "causal_top_left_empty_splits": ((1, 2, 2, 4, 60, 16, 16, torch.float32, {"causal": True}, "none"), (), 4, 16),
    "window_bottom_right": ((1, 2, 1, 2, 80, 16, 16, torch.float32, {"window": 20, "bottom_right": True}, "none"),
                            (), 8, 16),
    "key_padding_alibi": ((2, 2, 2, 1, 40, 16, 16, torch.float32, {}, "key_padding"), ("alibi",), 2, 16),
    "key_padding_empty_splits": ((2, 2, 2, 1, 40, 16, 16, torch.float32, {}, "key_padding"), (), 8, 16),
    "additive_rope_dropout": ((1, 4, 1, 2, 45, 16, 16, torch.float16, {"causal": True, "bottom_right": True},
                               "additive"), ("rope", "dropout"), 3, 32),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_plan_bytes_match_kernel(case: str) -> None:
    """Both phases of the split-KV kernel: plan bytes (incl. scratch traffic) equal the counted bytes."""
    attn_case, extras, num_splits, block_n = DECODE_CASES[case]
    spec, inputs, flags = _attention_case(attn_case, frozenset(extras))
    plan = TiledPlan(spec, TileConfig(block_n=block_n, num_splits=num_splits), family="attention_decode")
    with count_io() as io:
        attention_decode_triton(inputs, flags, block_n=block_n, num_splits=num_splits)
    assert plan.kernel_family == "attention_decode"
    assert _close(plan.hbm_read_bytes, io.read_bytes), (plan.hbm_read_bytes, io.read_bytes)
    assert _close(plan.hbm_write_bytes, io.write_bytes), (plan.hbm_write_bytes, io.write_bytes)
    assert plan.grid[1] == spec.batch * spec.kv_heads  # type: ignore[operator]
    assert plan.combine_grid == (spec.batch * spec.q_heads * spec.q_len,)  # type: ignore[operator]
    assert plan.flops > 0 and plan.feasible({"smem_bytes": 228 * 1024, "max_head_dim": 256})


def test_decode_family_choice_and_split_structure() -> None:
    """Family "auto" picks the kernel codegen/gpu.py dispatches; the visible range is cut into block-aligned splits."""
    decode = AttentionSpec(4, 32, 8, 1, 4096, 128, 128, "bfloat16", 0.08, causal=True, align="bottom_right")
    assert TiledPlan(decode).kernel_family == "attention_decode"
    assert TiledPlan(AttentionSpec(4, 32, 8, 64, 4096, 128, 128, "bfloat16", 0.08)).kernel_family == "attention"
    assert TiledPlan(AttentionSpec(1, 1, 1, 1, 128, 64, 64, "float16", 0.1)).kernel_family == "attention"
    plan = TiledPlan(decode, TileConfig(block_n=64))
    assert plan.blocks == (16, 64, 128, 128) and plan.grid == (9, 32)  # ceil(264 / 32) splits over 64 key blocks
    layout = plan.decode_layout()
    assert layout.split_len == 8 * 64 and layout.work_splits == 8  # 64 blocks in 8-block splits: one split idle
    windowed = TiledPlan(dataclasses.replace(decode, window=100), TileConfig(block_n=64, num_splits=4))
    assert windowed.decode_layout()[:2] == (3968, 4096)  # only the window's two key blocks are visible
    assert windowed.decode_layout().work_splits == 2
    assert TiledPlan(decode, TileConfig(block_n=64), family="attention").grid == (1, 128)
    wide = dataclasses.replace(decode, q_len=16, head_dim=256, v_head_dim=256)  # 64 rows of D 256 would spill
    assert not TiledPlan(wide, family="attention_decode").feasible({})
    with pytest.raises(ValueError, match="family"):
        _ = TiledPlan(decode, family="decode").grid


def test_key_block_skipping_structure() -> None:
    base = AttentionSpec(1, 1, 1, 64, 64, 16, 16, "float32", 0.25, causal=True)
    plan = TiledPlan(base, TileConfig(16, 16))
    assert [list(plan.key_blocks_per_program(m)) for m in range(4)] == [[0], [0, 16], [0, 16, 32], [0, 16, 32, 48]]
    windowed = TiledPlan(AttentionSpec(1, 1, 1, 64, 64, 16, 16, "float32", 0.25, causal=True, window=8),
                         TileConfig(16, 16))  # fmt: skip
    assert list(windowed.key_blocks_per_program(3)) == [32, 48]  # first_pos 48 - 8 + 1 = 41 -> block 32
    # bottom-right with Nq > Nk: the first query block sees no key at all
    br = TiledPlan(AttentionSpec(1, 1, 1, 40, 16, 16, 16, "float32", 0.25, causal=True, align="bottom_right"),
                   TileConfig(16, 16))  # fmt: skip
    assert len(br.key_blocks_per_program(0)) == 0 and len(br.key_blocks_per_program(2)) == 1
    assert kept_pairs(base) == 64 * 65 // 2
    # the launcher clamps blocks to the problem: a 128 request on N = 20 becomes 32
    assert TiledPlan(AttentionSpec(1, 1, 1, 20, 20, 40, 40, "float32", 0.25), TileConfig(128, 128)).blocks == (
        32, 32, 64, 64)  # fmt: skip


def test_feasibility_and_static_shapes() -> None:
    spec = AttentionSpec(1, 1, 1, 4096, 4096, 256, 256, "float16", 0.0625)
    big = TiledPlan(spec, TileConfig(256, 256, 8, 4))
    assert not big.feasible({"smem_bytes": 228 * 1024})
    assert any("shared memory" in r for r in big.infeasible_reasons({"smem_bytes": 228 * 1024}))
    assert TiledPlan(spec, TileConfig(64, 32, 4, 2)).feasible({"smem_bytes": 228 * 1024, "max_head_dim": 256})
    assert not TiledPlan(spec, TileConfig(64, 32)).feasible({"max_head_dim": 128})
    assert not TiledPlan(spec, TileConfig(48, 32)).feasible({})
    with pytest.raises(ValueError, match="dynamic"):
        _ = TiledPlan(AttentionSpec(1, 1, 1, None, 16, 16, 16, "float32", 0.25)).hbm_read_bytes


# name: (rms, width, shape, dtype, has_weight, has_bias, residual, weight_offset)
NORM_CASES = {
    "rms_weight": (True, 48, (3, 5, 48), torch.float32, True, False, False, 0.0),
    "rms_gemma_residual_fp16": (True, 40, (7, 40), torch.float16, True, False, True, 1.0),
    "layernorm_bias": (False, 33, (2, 4, 33), torch.float32, True, True, False, 0.0),
    "layernorm_residual_noweight": (False, 64, (6, 64), torch.bfloat16, False, False, True, 0.0),
}


@pytest.mark.parametrize("block", [64, 16])  # every case's row whole, or in chunks of 16 columns (x read twice)
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_norm_plan_bytes_match_kernel(case: str, block: int) -> None:
    rms, width, shape, dtype, has_w, has_b, has_res, offset = NORM_CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(dtype)
    weight = torch.randn(width, generator=gen).to(dtype) if has_w else None
    bias = torch.randn(width, generator=gen).to(dtype) if has_b else None
    residual = torch.randn(*shape, generator=gen).to(dtype) if has_res else None
    spec = NormSpec(
        norm="rmsnorm" if rms else "layernorm", width=width, shape=shape, dtype=_DTYPE_NAMES[dtype], eps=1e-6,
        has_weight=has_w, has_bias=has_b, weight_offset=offset, residual=has_res, out_dtype=_DTYPE_NAMES[dtype],
    )  # fmt: skip
    plan = TiledPlan(spec, TileConfig(block_n=block))
    with count_io() as io:
        y, *_ = norm_forward_triton(x, weight, bias, residual, 1e-6, offset, rms, block=block)
    assert y.dtype == dtype and plan.norm_chunked == (block == 16)
    assert _close(plan.hbm_read_bytes, io.read_bytes), (plan.hbm_read_bytes, io.read_bytes)
    assert _close(plan.hbm_write_bytes, io.write_bytes), (plan.hbm_write_bytes, io.write_bytes)
    assert plan.grid == (x.numel() // width,) and plan.flops > 0 and plan.sram_bytes > 0


@pytest.mark.parametrize("block", [64, 16])
@pytest.mark.parametrize("programs", [4, 5])
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_norm_backward_plan_bytes_match_kernel(
    case: str, programs: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows split over `programs` programs (num_splits); 5 leaves the last program short of rows (or, with 7 rows,
    one program without rows); rows whole or in chunks of 16 columns."""
    rms, width, shape, dtype, has_w, _, _, offset = NORM_CASES[case]
    monkeypatch.setattr("tilefuse.codegen.norm_kernels._CPU_BACKWARD_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(*shape, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(width, generator=gen).to(dtype) if has_w else None
    _, _, mean, rstd = norm_forward_triton(x, weight, None, None, 1e-6, offset, rms)
    spec = NormSpec(
        norm="rmsnorm" if rms else "layernorm", width=width, shape=shape, dtype=_DTYPE_NAMES[dtype], eps=1e-6,
        has_weight=has_w, weight_offset=offset, out_dtype=_DTYPE_NAMES[dtype],
    )  # fmt: skip
    plan = TiledPlan(spec, TileConfig(block_n=block, num_splits=programs), family="norm_backward")
    with count_io() as io:
        norm_backward_triton(grad, x, weight, mean, rstd, offset, rms, block=block)
    assert plan.kernel_family == "norm_backward" and plan.grid == (min(programs, x.numel() // width),)
    assert _close(plan.hbm_read_bytes, io.read_bytes), (plan.hbm_read_bytes, io.read_bytes)
    assert _close(plan.hbm_write_bytes, io.write_bytes), (plan.hbm_write_bytes, io.write_bytes)
    assert plan.flops > 0


@pytest.mark.parametrize(("width", "block", "chunked"), [(8192, 8192, False), (8193, 4096, True), (32768, 4096, True)])
def test_norm_default_config_chunks_rows_past_the_threshold(width: int, block: int, chunked: bool) -> None:
    """The launcher's row block: the whole row up to 8192 columns (32 warps), 4096-column chunks beyond (16 warps);
    a chunked forward reads x twice."""
    spec = NormSpec("rmsnorm", width, (3, width), "bfloat16", 1e-6, has_weight=False, out_dtype="bfloat16")
    config = default_config(spec)
    assert (config.block_n, config.num_warps) == (block, 16 if chunked else 32)
    for family in ("norm", "norm_backward"):
        plan = TiledPlan(spec, config, family)
        assert plan.blocks == (block,) and plan.norm_chunked == chunked
    assert TiledPlan(spec, config).hbm_read_bytes == 3 * width * 2 * (2 if chunked else 1)


# name: (layout, rotary_dim, head_dim, shape [B, H, N, D], cos shape, dtype)
ROPE_CASES = {
    "rotate_half_full": ("rotate_half", 32, 32, (2, 3, 17, 32), (17, 32), torch.float32),
    "interleaved_partial": ("interleaved", 16, 40, (1, 2, 9, 40), (9, 16), torch.float16),
    "rotate_half_partial_3d": ("rotate_half", 24, 30, (4, 13, 30), (13, 24), torch.float32),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_plan_bytes_match_kernel(case: str) -> None:
    layout, rotary_dim, head_dim, shape, cos_shape, dtype = ROPE_CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(dtype)
    cos = torch.randn(*cos_shape, generator=gen).to(dtype)
    sin = torch.randn(*cos_shape, generator=gen).to(dtype)
    spec = RopeSpec(layout=layout, rotary_dim=rotary_dim, head_dim=head_dim, shape=shape,  # type: ignore[arg-type]
                    dtype=_DTYPE_NAMES[dtype])  # fmt: skip
    plan = TiledPlan(spec)
    code = ref.ROPE_ROTATE_HALF if layout == "rotate_half" else ref.ROPE_INTERLEAVED
    with count_io() as io:
        rope_forward_triton(x, cos, sin, code, rotary_dim)
    assert _close(plan.hbm_read_bytes, io.read_bytes), (plan.hbm_read_bytes, io.read_bytes)
    assert _close(plan.hbm_write_bytes, io.write_bytes), (plan.hbm_write_bytes, io.write_bytes)


def test_count_io_restores_interpreter_on_exit() -> None:
    original = interpreter.InterpreterBuilder.create_masked_load
    with pytest.raises(RuntimeError), count_io():
        assert interpreter.InterpreterBuilder.create_masked_load is not original
        raise RuntimeError("boom")
    assert interpreter.InterpreterBuilder.create_masked_load is original
    x = torch.randn(4, 16)
    with count_io() as io:
        norm_forward_triton(x, None, None, None, 1e-6, 0.0, True)
    assert io.read_bytes == x.numel() * 4 and io.loads == 4  # one x load per row program
