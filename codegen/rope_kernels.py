"""Standalone rotary-embedding Triton kernel, forward and backward, for RoPE sites not fused into attention.

Semantics are those of `reference.rope_forward` / `reference.rope_backward`: layout 0 pairs feature i with i + r/2
(rotate-half), layout 1 pairs 2i with 2i+1 (interleaved); only the first `rotary_dim` features rotate, the tail is
copied; cos/sin broadcast over the leading dims through stride-0 strides, never materialized.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tilefuse.codegen import emit
from tilefuse.codegen.reference import ROPE_INTERLEAVED, ROPE_ROTATE_HALF

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_LEADING_DIMS = 3  # [B, H, N] before the feature dim
DEFAULT_BLOCK_ROWS = 16  # rows (one head vector each) per program
DEFAULT_WARPS = 4
MAX_ROWS = 2**31 - 1  # row indices (rows + BLOCK_ROWS) are int32 in the kernel


@triton.jit
def _load_pairs(  # type: ignore[no-untyped-def]
    ROW, stride, mask, pair_mask, half,
    BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    """The rotated features of BLOCK_ROWS rows (ROW: [BLOCK_ROWS, 1] row pointers) as two fp32 [BLOCK_ROWS,
    BLOCK_HALF] tiles, feature j paired with j + half (layout 0) or 2j with 2j+1 (layout 1). Layout 1 loads the
    row's 2·half features in one contiguous tile and splits the pairs in registers: two stride-2 gathers would
    not vectorize."""
    j = tl.arange(0, BLOCK_HALF)[None, :]
    if LAYOUT == 0:
        v1 = tl.load(ROW + j * stride, mask=mask, other=0.0).to(tl.float32)
        v2 = tl.load(ROW + (j + half) * stride, mask=mask, other=0.0).to(tl.float32)
    else:
        k = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        tile = tl.load(ROW + k * stride, mask=pair_mask, other=0.0).to(tl.float32)
        v1, v2 = tl.split(tl.reshape(tile, [BLOCK_ROWS, BLOCK_HALF, 2]))
    return v1, v2


@triton.jit
def rope_kernel(  # type: ignore[no-untyped-def]  # triton kernels are untyped
    X, COS, SIN, Y,
    rows, dim1, dim2, head_dim, half,
    cos_s0, cos_s1, cos_s2, cos_s3, sin_s0, sin_s1, sin_s2, sin_s3,
    BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    LAYOUT: tl.constexpr, BACKWARD: tl.constexpr, HAS_TAIL: tl.constexpr,
):  # fmt: skip
    # Row indices are 32-bit (the launcher keeps rows + BLOCK_ROWS under 2^31): a 64-bit div/mod is a long
    # software routine on the GPU, a 32-bit one a few integer instructions. Element offsets are 64-bit
    # (rows * head_dim, and a cos/sin table as large as x, may pass 2^31).
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row < rows
    # Split the flat row into [B, H, N] (two divisions) so cos/sin are read through their own (possibly zero) strides.
    bh = row // dim2
    n = (row - bh * dim2).to(tl.int64)
    b = bh // dim1
    h = (bh - b * dim1).to(tl.int64)
    b = b.to(tl.int64)
    cos_row = (b * cos_s0 + h * cos_s1 + n * cos_s2)[:, None]
    sin_row = (b * sin_s0 + h * sin_s1 + n * sin_s2)[:, None]
    x_row = (row.to(tl.int64) * head_dim)[:, None]
    j = tl.arange(0, BLOCK_HALF)
    mask = row_mask[:, None] & (j < half)[None, :]
    pair_mask = row_mask[:, None] & (tl.arange(0, 2 * BLOCK_HALF) < 2 * half)[None, :]
    x1, x2 = _load_pairs(X + x_row, 1, mask, pair_mask, half, BLOCK_ROWS, BLOCK_HALF, LAYOUT)
    c1, c2 = _load_pairs(COS + cos_row, cos_s3, mask, pair_mask, half, BLOCK_ROWS, BLOCK_HALF, LAYOUT)
    s1, s2 = _load_pairs(SIN + sin_row, sin_s3, mask, pair_mask, half, BLOCK_ROWS, BLOCK_HALF, LAYOUT)
    if BACKWARD:  # dx = dy·cos - R(dy·sin), R antisymmetric
        out1 = x1 * c1 + x2 * s2
        out2 = x2 * c2 - x1 * s1
    else:  # y = x·cos + R(x)·sin
        out1 = x1 * c1 - x2 * s1
        out2 = x2 * c2 + x1 * s2
    out1, out2 = out1.to(Y.dtype.element_ty), out2.to(Y.dtype.element_ty)
    if LAYOUT == 0:
        tl.store(Y + x_row + j[None, :], out1, mask=mask)
        tl.store(Y + x_row + half + j[None, :], out2, mask=mask)
    else:  # interleave the pairs back into one contiguous store
        pairs = tl.reshape(tl.join(out1, out2), [BLOCK_ROWS, 2 * BLOCK_HALF])
        tl.store(Y + x_row + tl.arange(0, 2 * BLOCK_HALF)[None, :], pairs, mask=pair_mask)
    if HAS_TAIL:
        tail = 2 * half + tl.arange(0, BLOCK_TAIL)[None, :]
        tail_mask = row_mask[:, None] & (tail < head_dim)
        passthrough = tl.load(X + x_row + tail, mask=tail_mask, other=0.0)
        tl.store(Y + x_row + tail, passthrough.to(Y.dtype.element_ty), mask=tail_mask)


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {dtype}; supported: float16, bfloat16, float32")


def _check_args(x: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int) -> None:
    """Guard: layout, rotary_dim, dtypes, devices and cos/sin shapes, each error naming the argument."""
    if layout not in (ROPE_ROTATE_HALF, ROPE_INTERLEAVED):
        raise ValueError(f"layout={layout}; expected {ROPE_ROTATE_HALF} (rotate-half) or {ROPE_INTERLEAVED}")
    if x.dim() < 1 or x.dim() - 1 > _MAX_LEADING_DIMS:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected 1 to {_MAX_LEADING_DIMS + 1} dims")
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim={rotary_dim}; expected an even number in [2, {x.shape[-1]}]")
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        _check_dtype(name, t.dtype)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos has shape {tuple(cos.shape)} but sin has shape {tuple(sin.shape)}")
    if cos.dim() == 0 or cos.shape[-1] != rotary_dim:
        raise ValueError(f"cos has shape {tuple(cos.shape)}; its last dim must be rotary_dim={rotary_dim}")


def _broadcast_strides(name: str, t: Tensor, lead: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of t expanded to [*lead, r] (4-D), zero along broadcast dims."""
    try:
        expanded = t.expand(*lead, t.shape[-1])
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to x's leading dims {lead}") from err
    return tuple(int(s) for s in expanded.stride())


def _check_knobs(block_rows: int, num_warps: int) -> None:
    if not 1 <= block_rows <= 1024 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two in [1, 1024], got {block_rows}")
    if not 1 <= num_warps <= 32 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps}")


def _launch(src: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, out_dtype: torch.dtype,
            backward: bool, block_rows: int | None, num_warps: int | None) -> Tensor:  # fmt: skip
    _check_args(src, cos, sin, layout, rotary_dim)
    block_rows = DEFAULT_BLOCK_ROWS if block_rows is None else block_rows
    num_warps = DEFAULT_WARPS if num_warps is None else num_warps
    _check_knobs(block_rows, num_warps)
    _check_dtype("output", out_dtype)
    head_dim = src.shape[-1]
    lead = (1,) * (_MAX_LEADING_DIMS + 1 - src.dim()) + tuple(src.shape[:-1])
    cos_strides = _broadcast_strides("cos", cos, lead)
    sin_strides = _broadcast_strides("sin", sin, lead)
    src_c = src.contiguous()
    out = torch.empty_like(src_c, dtype=out_dtype)
    rows = src_c.numel() // head_dim if head_dim else 0
    if rows == 0:
        return out
    if rows > MAX_ROWS - block_rows:
        raise ValueError(f"x has {rows} rows; the kernel's 32-bit row indices allow {MAX_ROWS - block_rows}")
    half, tail = rotary_dim // 2, head_dim - rotary_dim
    emit.launch(
        rope_kernel, (triton.cdiv(rows, block_rows),),
        src_c, cos, sin, out, rows, lead[1], lead[2], head_dim, half, *cos_strides, *sin_strides,
        BLOCK_ROWS=block_rows, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)), LAYOUT=layout, BACKWARD=backward, HAS_TAIL=tail > 0,
        num_warps=num_warps,
    )  # fmt: skip
    return out


def rope_forward_triton(
    x: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, *, block_rows: int | None = None,
    num_warps: int | None = None,
) -> Tensor:  # fmt: skip
    """y[..., :r] = x·cos + R(x)·sin, y[..., r:] = x[..., r:]; dtype = result_type(x, cos). `block_rows` head
    vectors per program and `num_warps` (powers of two) default to DEFAULT_BLOCK_ROWS and DEFAULT_WARPS."""
    return _launch(x, cos, sin, layout, rotary_dim, torch.result_type(x, cos), False, block_rows, num_warps)


def rope_backward_triton(
    grad: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, x_dtype: torch.dtype, *,
    block_rows: int | None = None, num_warps: int | None = None,
) -> Tensor:  # fmt: skip
    """dx[..., :r] = dy·cos - R(dy·sin), dx[..., r:] = dy[..., r:]; dtype = x_dtype. Knobs as in the forward."""
    return _launch(grad, cos, sin, layout, rotary_dim, x_dtype, True, block_rows, num_warps)
