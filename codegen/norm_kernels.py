"""Triton RMSNorm / LayerNorm kernels, forward and backward, with an optional fused residual add.

Semantics are those of `reference.norm_forward` / `reference.norm_backward`: statistics in fp32, any width (padded
to a power of two and masked), Gemma's `(weight + offset)`, output dtype = promote(x, weight, bias).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import emit

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Programs of the backward on CPU (interpreter): few, so each one reduces several rows into its partial sums.
_CPU_BACKWARD_PROGRAMS = 4


@triton.jit
def _norm_forward_kernel(  # type: ignore[no-untyped-def]  # triton kernels are untyped
    X, RES, W, B, Y, SUM, MEAN, RSTD,
    width, eps, weight_offset,
    BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # row * width can exceed 2^31
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    offsets = row * width + cols
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        total = (x + tl.load(RES + offsets, mask=mask, other=0.0).to(tl.float32)).to(SUM.dtype.element_ty)
        tl.store(SUM + offsets, total, mask=mask)
        # Normalize the stored (rounded) sum, exactly as the unfused `norm(x + residual)` would.
        x = total.to(tl.float32)
    if RMS:
        centered = x
    else:
        mean = tl.sum(x, axis=0) / width
        tl.store(MEAN + row, mean)
        centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / width + eps)
    tl.store(RSTD + row, rstd)
    y = centered * rstd
    if HAS_WEIGHT:
        y = y * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(  # type: ignore[no-untyped-def]
    G, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
    rows, width, weight_offset, rows_per_program,
    BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < width
    w = tl.full([BLOCK], 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset
    dw_acc = tl.zeros([BLOCK], tl.float32)
    db_acc = tl.zeros([BLOCK], tl.float32)
    for i in range(rows_per_program):
        row = pid * rows_per_program + i
        # Rows past the end get an empty mask (a single comparison: the interpreter rejects `&` with a scalar).
        mask = cols < tl.where(row < rows, width, 0)
        offsets = row * width + cols
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row < rows, other=0.0)
        mean = 0.0
        if not RMS:
            mean = tl.load(MEAN + row, mask=row < rows, other=0.0)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dw_acc += g * xhat
        db_acc += g
        gw = g * w
        dx = gw - xhat * (tl.sum(gw * xhat, axis=0) / width)
        if not RMS:
            dx = dx - tl.sum(gw, axis=0) / width
        tl.store(DX + offsets, (dx * rstd).to(DX.dtype.element_ty), mask=mask)
    # One partial row per program; the launcher sums them (deterministic, no atomics).
    tl.store(DW_PARTIAL + pid * width + cols, dw_acc, mask=col_mask)
    tl.store(DB_PARTIAL + pid * width + cols, db_acc, mask=col_mask)


def _check_tensor(name: str, t: Tensor, device: torch.device, width: int | None = None) -> None:
    """Guard: supported float dtype, same device as x, and (when given) last dim equal to the norm width."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if width is not None and (t.dim() == 0 or t.shape[-1] != width):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; its last dim must be the norm width {width}")


def _check_param(name: str, t: Tensor | None, x: Tensor) -> None:
    if t is not None:
        _check_tensor(name, t, x.device, x.shape[-1])
        if t.dim() != 1:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({x.shape[-1]},)")


def _rows_view(t: Tensor) -> Tensor:
    """Contiguous [rows, width] view (copies only when the layout is not already row-major)."""
    return t.contiguous().view(-1, t.shape[-1])


def _out_dtype(dtype: torch.dtype, weight: Tensor | None, bias: Tensor | None) -> torch.dtype:
    """The normalized input's dtype promoted with the parameters' (as `reference.norm_out_dtype`)."""
    for param in (weight, bias):
        if param is not None:
            dtype = torch.promote_types(dtype, param.dtype)
    return dtype


def _block(width: int) -> int:
    return int(triton.next_power_of_2(width))


def _warps(requested: int | None, width: int) -> int:
    if requested is None:
        return default_warps(_block(width))
    if not 1 <= requested <= 32 or requested & (requested - 1):
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {requested}")
    return requested


def default_warps(block: int) -> int:
    """Warps per row program: enough threads that a row's BLOCK elements fit in registers without spilling, and no
    more (at 16 warps the register file caps a thread at 128 registers). `tilefuse compile-check` on Triton 3.6
    and 3.9, sm_80 and sm_90: the backward at BLOCK=4096 spills with 4 warps and (3.6) with 16, not with 8; at
    8192 it spills ~200 bytes with 16 warps, not with 32 on sm_90. At 16384 it spills even with 32 (a whole row
    plus the dweight accumulator per thread); the autotuner's warps knob cannot fix that."""
    if block >= 8192:
        return 32
    if block >= 1024:
        return 8
    return 4


def norm_forward_triton(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    weight_offset: float,
    rms: bool,
    *,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """(y, x + residual or None, mean or None (RMSNorm), rstd); mean/rstd are fp32 with shape x.shape[:-1] + (1,).
    `num_warps` per row program (a power of two <= 32); None: `default_warps` of the row's block."""
    _check_tensor("x", x, x.device)
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)
    if residual is not None:
        _check_tensor("residual", residual, x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has shape {tuple(x.shape)}")
    x2 = _rows_view(x)
    rows, width = x2.shape
    stat_shape = (*x.shape[:-1], 1)
    total = None
    if residual is not None:
        total = torch.empty_like(x2, dtype=torch.result_type(x, residual))
    y = torch.empty_like(x2, dtype=_out_dtype(total.dtype if total is not None else x.dtype, weight, bias))
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows > 0:
        res2 = _rows_view(residual) if residual is not None else None
        emit.launch(
            _norm_forward_kernel, (rows,), x2, res2, weight, bias, y, total, mean, rstd, width, eps, weight_offset,
            BLOCK=_block(width), RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, num_warps=_warps(num_warps, width),
        )  # fmt: skip
    total_out = total.view(x.shape) if total is not None else None
    mean_out = mean.view(stat_shape) if mean is not None else None
    return y.view(x.shape), total_out, mean_out, rstd.view(stat_shape)


def _backward_programs(rows: int, device: torch.device) -> int:
    """Enough programs to fill the GPU once; each reduces a slice of rows into one partial dweight/dbias row."""
    if device.type == "cuda":
        slots = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        slots = _CPU_BACKWARD_PROGRAMS
    return max(1, min(rows, slots))


def _row_stat(name: str, t: Tensor, rows: int, device: torch.device) -> Tensor:
    if t.numel() != rows or t.device != device:
        raise ValueError(f"{name} has shape {tuple(t.shape)} on {t.device}; expected {rows} values on {device}")
    return t.reshape(rows).to(torch.float32).contiguous()


def norm_backward_triton(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    weight_offset: float,
    rms: bool,
    *,
    num_warps: int | None = None,
    programs: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(dx in x.dtype, dweight in weight.dtype or None, dbias in fp32), parameter grads reduced over all rows.
    `programs` slices the rows (each program writes one partial dweight/dbias row; None: one per SM), `num_warps`
    as in the forward."""
    _check_tensor("x", x, x.device)
    _check_tensor("grad", grad, x.device)
    if grad.shape != x.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but x has shape {tuple(x.shape)}")
    _check_param("weight", weight, x)
    if not rms and mean is None:
        raise ValueError("mean is required for LayerNorm (rms=False)")
    x2, g2 = _rows_view(x), _rows_view(grad)
    rows, width = x2.shape
    rstd1 = _row_stat("rstd", rstd, rows, x.device)
    mean1 = _row_stat("mean", mean, rows, x.device) if mean is not None and not rms else None
    if programs is not None and programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    programs = max(1, min(rows, programs)) if programs is not None else _backward_programs(rows, x.device)
    rows_per_program = triton.cdiv(rows, programs)
    dx = torch.empty_like(x2)
    dw_partial = torch.zeros(programs, width, dtype=torch.float32, device=x.device)
    db_partial = torch.zeros(programs, width, dtype=torch.float32, device=x.device)
    if rows > 0:
        emit.launch(
            _norm_backward_kernel, (programs,),
            g2, x2, weight, mean1, rstd1, dx, dw_partial, db_partial, rows, width, weight_offset, rows_per_program,
            BLOCK=_block(width), RMS=rms, HAS_WEIGHT=weight is not None, num_warps=_warps(num_warps, width),
        )  # fmt: skip
    dweight = dw_partial.sum(dim=0).to(weight.dtype) if weight is not None else None
    return dx.view(x.shape), dweight, db_partial.sum(dim=0)
