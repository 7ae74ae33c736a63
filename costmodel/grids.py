"""The shape grids `tilefuse costmodel collect` enumerates per kernel family: "tiny" (interpreter tests: a few
seconds per family on CPU), "small" (a handful of Llama/Qwen/Mistral-like shapes per family, for one GPU lease) and
"full" (the training grid), plus the small knob grids the interpreter collection uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from tilefuse.codegen.families import KERNEL_FAMILIES
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

SHAPE_GRIDS = ("tiny", "small", "full")
DTYPES = ("bfloat16", "float16")
# Knob grids of the interpreter collection (tiny shapes): two or four configs per Spec.
TINY_CHOICES: dict[str, dict[str, Sequence[int]]] = {
    "attention": {"block_m": (16, 32), "block_n": (16, 32), "num_warps": (4,), "num_stages": (1, 2)},
    "attention_decode": {"block_n": (32, 64), "num_warps": (4,), "num_stages": (1,), "num_splits": (2, 4)},
    "attention_backward": {"block_m": (16, 32), "block_n": (16,), "num_warps": (4,), "num_stages": (1,)},
    "norm": {"num_warps": (1, 2), "block_n": (16, 64)},  # rows whole or in chunks of 16 columns
    "norm_backward": {"num_warps": (1,), "num_splits": (2, 4), "block_n": (16, 64)},
    "rope": {"block_m": (2, 4), "num_warps": (1,)},
}  # fmt: skip


def _attention(batch: int, heads: int, group: int, q_len: int, kv_len: int, head_dim: int, dtype: str,
               causal: bool) -> AttentionSpec:  # fmt: skip
    return AttentionSpec(batch, heads, heads // group, q_len, kv_len, head_dim, head_dim, dtype, head_dim**-0.5,
                         causal, "bottom_right" if q_len != kv_len else "top_left", gqa_group=group)  # fmt: skip


def _prefill(grid: str) -> list[Spec]:
    """Attention forward and backward: "small" 8 shapes, "full" 144 (about 16k query tokens per launch)."""
    if grid == "tiny":
        return [_attention(1, 1, 1, seq, seq, 16, "float32", False) for seq in (16, 32)]
    if grid == "small":
        return [_attention(max(1, 8192 // s), 16, 1, s, s, d, "bfloat16", c)
                for d in (64, 128) for s in (512, 2048) for c in (False, True)]  # fmt: skip
    return [_attention(max(1, 16384 // s), 32, g, s, s, d, t, c)
            for t in DTYPES for d in (64, 80, 128) for s in (128, 512, 1024, 2048, 4096, 8192)
            for g in (1, 4) for c in (False, True)]  # fmt: skip


def _decode(grid: str) -> list[Spec]:
    """Split-KV decode, one query token per sequence: "small" 8 shapes (Llama-3-8B-like, GQA 4/8), "full" 60 (KV 1k
    to 128k, GQA 1/4/8, head dims 64/128; batch shrinks as the cache grows, about 256k cached tokens per launch)."""
    if grid == "tiny":
        return [_attention(1, 2, 2, 1, 256, 16, "float32", True)]
    if grid == "small":
        return [_attention(b, 32, g, 1, n, 128, "bfloat16", True)
                for g in (4, 8) for n in (4096, 32768) for b in (1, 8)]  # fmt: skip
    return [_attention(max(1, min(64, 262144 // n)), 32, g, 1, n, d, t, True)
            for t in DTYPES for d in (64, 128) for n in (1024, 4096, 16384, 32768, 131072)
            for g in (1, 4, 8)]  # fmt: skip


def _norm(norm: str, width: int, rows: int, dtype: str, residual: bool) -> NormSpec:
    return NormSpec(norm, width, (rows, width), dtype, 1e-6 if norm == "rmsnorm" else 1e-5,  # type: ignore[arg-type]
                    has_bias=norm == "layernorm", residual=residual, compute_dtype="float32",
                    out_dtype=dtype)  # fmt: skip


def _norms(grid: str, backward: bool) -> list[Spec]:
    """RMSNorm and LayerNorm: "small" 8 shapes, "full" widths 2048-16384 (Llama, Qwen, Mistral hidden sizes; 16384
    is Llama-3.1-405B's, past `norm_kernels.MAX_ROW_BLOCK`: chunked rows) with 1k-16k rows (144 forward shapes with
    and without a fused residual add, 72 backward)."""
    residuals = (False,) if backward else (False, True)
    if grid == "tiny":
        return [_norm("rmsnorm", 64, 8, "float32", False), _norm("layernorm", 48, 6, "float32", not backward)]
    if grid == "small":
        return [_norm(n, w, r, "bfloat16", False) for n in ("rmsnorm", "layernorm")
                for w, r in ((4096, 2048), (4096, 16384), (8192, 16384), (16384, 4096))]  # fmt: skip
    return [_norm(n, w, r, t, res) for t in DTYPES for n in ("rmsnorm", "layernorm")
            for w in (2048, 3584, 4096, 5120, 8192, 16384) for r in (1024, 4096, 16384)
            for res in residuals]  # fmt: skip


def _rope(layout: str, rotary_dim: int, head_dim: int, batch: int, heads: int, seq: int, dtype: str) -> RopeSpec:
    return RopeSpec(layout, rotary_dim, head_dim, (batch, heads, seq, head_dim), dtype)  # type: ignore[arg-type]


def _ropes(grid: str) -> list[Spec]:
    """RoPE on [B, H, N, D]: "small" 8 shapes, "full" 64 (head dims 64/128, full and half rotary, both layouts,
    1k-16k tokens with 8 or 32 heads)."""
    if grid == "tiny":
        return [_rope("rotate_half", 16, 16, 1, 2, 8, "float32"), _rope("interleaved", 8, 16, 1, 2, 8, "float32")]
    if grid == "small":
        return [_rope(layout, d * f // 2, d, 1, 32, 4096, "bfloat16") for layout in ("rotate_half", "interleaved")
                for d in (64, 128) for f in (1, 2)]  # fmt: skip
    shapes = ((1, 32, 1024), (4, 32, 4096), (16, 8, 1024), (1, 8, 16384))
    return [_rope(layout, d // f, d, b, h, n, t) for t in DTYPES for layout in ("rotate_half", "interleaved")
            for d in (64, 128) for f in (1, 2) for b, h, n in shapes]  # fmt: skip


def shape_grid(family: str, grid: str) -> list[Spec]:
    """The Specs `collect` enumerates for kernel `family` (codegen.families.KERNEL_FAMILIES) on `grid`."""
    if family not in KERNEL_FAMILIES:
        raise ValueError(f"family={family!r}; collect supports {list(KERNEL_FAMILIES)}")
    if grid not in SHAPE_GRIDS:
        raise ValueError(f"shapes={grid!r}; expected one of {list(SHAPE_GRIDS)}")
    if family in ("attention", "attention_backward"):
        return _prefill(grid)
    if family == "attention_decode":
        return _decode(grid)
    if family in ("norm", "norm_backward"):
        return _norms(grid, family == "norm_backward")
    return _ropes(grid)
