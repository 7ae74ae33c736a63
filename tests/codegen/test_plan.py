"""TiledPlan byte predictions equal the bytes the Triton kernels really move (counted under the interpreter)."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed; the Triton kernels cannot run")

from triton.runtime import interpreter

from tilefuse.codegen import reference as ref
from tilefuse.codegen.attention_fwd import attention_forward_triton
from tilefuse.codegen.io_count import count_io
from tilefuse.codegen.norm_kernels import norm_forward_triton
from tilefuse.codegen.plan import TileConfig, TiledPlan, io_lower_bound_bytes, kept_pairs
from tilefuse.codegen.rope_kernels import rope_forward_triton
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
CONFIGS = [TileConfig(16, 16), TileConfig(16, 32)]


def _attention_case(name: str) -> tuple[AttentionSpec, ref.AttnInputs, ref.AttnFlags]:
    b, hq, hkv, nq, nk, d, dv, dtype, flag_kw, mask_kind = ATTN_CASES[name]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, nk, dv, generator=gen).to(dtype)
    mask = None
    if mask_kind == "key_padding":
        mask = torch.arange(nk)[None, None, None, :] < torch.tensor([nk, nk - 9])[:, None, None, None]
    elif mask_kind == "additive":
        mask = torch.randn(1, hq, nq, nk, generator=gen).to(dtype)
    flags = ref.AttnFlags(scale=d**-0.5, **flag_kw)
    spec = AttentionSpec(
        batch=b, q_heads=hq, kv_heads=hkv, q_len=nq, kv_len=nk, head_dim=d, v_head_dim=dv,
        dtype=_DTYPE_NAMES[dtype], scale=flags.scale, causal=flags.causal,
        align="bottom_right" if flags.bottom_right else "top_left", window=flags.window or None,
        mask=mask_kind, mask_shape=tuple(mask.shape) if mask is not None else (), gqa_group=hq // hkv,
    )  # fmt: skip
    return spec, ref.AttnInputs(q, k, v, mask=mask), flags


def _close(predicted: int, counted: int) -> bool:
    return abs(predicted - counted) <= 0.01 * max(counted, 1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}")
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_plan_bytes_match_kernel(case: str, config: TileConfig) -> None:
    spec, inputs, flags = _attention_case(case)
    plan = TiledPlan(spec, config)
    with count_io() as io:
        attention_forward_triton(inputs, flags, block_m=config.block_m, block_n=config.block_n)
    assert _close(plan.hbm_read_bytes, io.read_bytes), (plan.hbm_read_bytes, io.read_bytes)
    assert _close(plan.hbm_write_bytes, io.write_bytes), (plan.hbm_write_bytes, io.write_bytes)
    assert plan.grid[1] == spec.batch * spec.q_heads  # type: ignore[operator]
    bound = io_lower_bound_bytes(spec, plan.sram_bytes)
    assert 0 < bound <= plan.hbm_read_bytes + plan.hbm_write_bytes
    assert plan.flops > 0 and plan.feasible({"smem_bytes": 228 * 1024, "max_head_dim": 256})


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


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_norm_plan_bytes_match_kernel(case: str) -> None:
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
    plan = TiledPlan(spec)
    with count_io() as io:
        y, *_ = norm_forward_triton(x, weight, bias, residual, 1e-6, offset, rms)
    assert y.dtype == dtype
    assert _close(plan.hbm_read_bytes, io.read_bytes), (plan.hbm_read_bytes, io.read_bytes)
    assert _close(plan.hbm_write_bytes, io.write_bytes), (plan.hbm_write_bytes, io.write_bytes)
    assert plan.grid == (x.numel() // width,) and plan.flops > 0 and plan.sram_bytes > 0


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
