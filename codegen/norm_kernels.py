"""Triton RMSNorm / LayerNorm kernels, forward and backward, with an optional fused residual add.

Semantics are those of `reference.norm_forward` / `reference.norm_backward`: statistics in fp32, any width (padded
to a power of two and masked), Gemma's `(weight + offset)`, output dtype = promote(x, weight, bias), eps placed as
NormSpec.eps_mode says (added to the mean square, clamping or added to the scaled norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..specs import eps_mode_code
from . import emit

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Programs of the backward on CPU (interpreter): few, so each one reduces several rows into its partial sums.
_CPU_BACKWARD_PROGRAMS = 4
# Widest row a program holds whole, in registers (the backward also keeps a dweight/dbias accumulator that wide):
# `tilefuse compile-check` finds the backward spill-free at 8192 columns (32 warps) on sm_80 and sm_90, Triton 3.6
# and 3.9, and spilling 112-240 bytes at 16384 even with 32 warps. Wider rows run the chunked kernels,
# DEFAULT_CHUNK columns at a time (spill-free at 16 warps on both arches and Tritons).
MAX_ROW_BLOCK = 8192
DEFAULT_CHUNK = 4096


@triton.jit
def _inverse_norm(mean_square, eps, norm_scale, EPS_MODE: tl.constexpr):  # type: ignore[no-untyped-def]
    """rstd of a row from its mean square (reference.inverse_norm), stat = norm_scale·sqrt(mean_square). EPS_MODE is
    specs.eps_mode_code's: 0 mean_square, 1 clamp_norm, 2 add_norm."""
    if EPS_MODE == 0:
        rstd = 1.0 / tl.sqrt(mean_square * (norm_scale * norm_scale) + eps)
    elif EPS_MODE == 1:
        stat = tl.sqrt(mean_square) * norm_scale
        rstd = 1.0 / tl.where(stat < eps, eps, stat)  # F.normalize's clamp_min; a NaN stat stays NaN
    else:
        rstd = 1.0 / (tl.sqrt(mean_square) * norm_scale + eps)
    return rstd


@triton.jit
def _projection_gain(mean_square, eps, norm_scale, EPS_MODE: tl.constexpr):  # type: ignore[no-untyped-def]
    """The factor on the backward's x̂·Σ(g·w·x̂)/width term (reference.projection_gain)."""
    gain = norm_scale * norm_scale
    if EPS_MODE == 1:
        gain = tl.where(tl.sqrt(mean_square) * norm_scale >= eps, gain, 0.0)
    elif EPS_MODE == 2:
        stat = tl.sqrt(mean_square) * norm_scale
        gain = gain * (1.0 + eps / tl.where(stat > 0, stat, 1.0))
    return gain


@triton.jit
def norm_forward_kernel(  # type: ignore[no-untyped-def]  # triton kernels are untyped
    X, RES, W, B, Y, SUM, MEAN, RSTD,
    width, eps, weight_offset, norm_scale,
    BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, EPS_MODE: tl.constexpr,
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
    rstd = _inverse_norm(tl.sum(centered * centered, axis=0) / width, eps, norm_scale, EPS_MODE)
    tl.store(RSTD + row, rstd)
    y = centered * rstd
    if HAS_WEIGHT:
        y = y * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def norm_backward_kernel(  # type: ignore[no-untyped-def]
    G, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
    rows, width, weight_offset, rows_per_program, eps, norm_scale,
    BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, EPS_MODE: tl.constexpr,
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
        if not RMS:  # RMSNorm has no bias: its dbias is never accumulated (RMS is constexpr: the branch folds away)
            db_acc += g
        gw = g * w
        gain = norm_scale * norm_scale
        if EPS_MODE != 0:  # the gain depends on the row's norm: recompute its mean square
            centered = tl.where(mask, x - mean, 0.0)
            gain = _projection_gain(tl.sum(centered * centered, axis=0) / width, eps, norm_scale, EPS_MODE)
        dx = gw - xhat * (tl.sum(gw * xhat, axis=0) / width * gain)
        if not RMS:
            dx = dx - tl.sum(gw, axis=0) / width
        tl.store(DX + offsets, (dx * rstd).to(DX.dtype.element_ty), mask=mask)
    # One partial row per program; the launcher sums them (deterministic, no atomics).
    tl.store(DW_PARTIAL + pid * width + cols, dw_acc, mask=col_mask)
    if not RMS:
        tl.store(DB_PARTIAL + pid * width + cols, db_acc, mask=col_mask)


@triton.jit
def _add_pair(a0, a1, b0, b1):  # type: ignore[no-untyped-def]
    return a0 + b0, a1 + b1


@triton.jit
def norm_forward_chunked_kernel(  # type: ignore[no-untyped-def]
    X, RES, W, B, Y, SUM, MEAN, RSTD,
    width, eps, weight_offset, norm_scale,
    CHUNK: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, EPS_MODE: tl.constexpr,
):  # fmt: skip
    """`norm_forward_kernel` for rows wider than a register block: pass 1 accumulates the statistics chunk by
    chunk (LayerNorm: each chunk's mean and centered sum of squares, merged into the row's), pass 2 re-reads the
    row (the stored sum with a residual, so both passes normalize the same rounded values) and writes y."""
    row = tl.program_id(0).to(tl.int64)
    base = row * width
    sum_sq = tl.zeros([CHUNK], tl.float32)
    shift = 0.0  # LayerNorm: statistics are merged relative to the first chunk's mean (see below)
    mean = 0.0
    m2 = 0.0
    for start in range(0, width, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        mask = cols < width
        x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            total = (x + tl.load(RES + base + cols, mask=mask, other=0.0).to(tl.float32)).to(SUM.dtype.element_ty)
            tl.store(SUM + base + cols, total, mask=mask)
            x = total.to(tl.float32)
        if RMS:
            sum_sq += x * x
        else:
            seen = start * 1.0
            count = tl.minimum(width - start, CHUNK) * 1.0
            shifted = tl.where(mask, x - shift, 0.0)
            rough = tl.sum(shifted, axis=0) / count
            centered = tl.where(mask, shifted - rough, 0.0)
            # The merge below is first-order in the chunk means' rounding, which scales with their magnitude: the
            # first chunk's rough mean becomes the frame, so means and merge hold values of the data's spread, not
            # of its offset (a row far from zero mean keeps its variance).
            first = tl.where(start == 0, rough, 0.0)
            shift += first
            # Corrected two-pass chunk statistics (Chan, Golub, LeVeque), merged into the running ones (Chan et al.)
            residue, square = tl.reduce((centered, centered * centered), 0, _add_pair)
            delta = rough - first + residue / count - mean
            mean += delta * (count / (seen + count))
            m2 += square - residue * residue / count + delta * delta * (seen * count / (seen + count))
    if RMS:
        m2 = tl.sum(sum_sq, axis=0)
    else:
        mean += shift
        tl.store(MEAN + row, mean)
    rstd = _inverse_norm(m2 / width, eps, norm_scale, EPS_MODE)
    tl.store(RSTD + row, rstd)
    if HAS_RESIDUAL:
        tl.debug_barrier()  # pass 2 reads the sum other threads of this program stored
        X = SUM
    for start in range(0, width, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        mask = cols < width
        x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            y = y * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + base + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_chunk(G, X, W, base, cols, mask, mean, rstd, weight_offset, HAS_WEIGHT: tl.constexpr):  # type: ignore[no-untyped-def]
    """dy, dy·(w + offset) and x̂ of one chunk of a row, in fp32 (zero past the row's end)."""
    g = tl.load(G + base + cols, mask=mask, other=0.0).to(tl.float32)
    gw = g
    if HAS_WEIGHT:
        gw = g * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset)
    xhat = tl.where(mask, (tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
    return g, gw, xhat


@triton.jit
def norm_backward_chunked_kernel(  # type: ignore[no-untyped-def]
    G, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
    rows, width, weight_offset, rows_per_program, eps, norm_scale,
    CHUNK: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, EPS_MODE: tl.constexpr,
):  # fmt: skip
    """`norm_backward_kernel` for rows wider than a register block: per row, pass 1 accumulates the two row dot
    products chunk by chunk, pass 2 re-reads the row, stores dx and adds the row's dweight/dbias terms into this
    program's partial rows in global memory (read-modify-write per chunk; the launcher zeroes them, and a program
    only ever touches its own row, so no atomics). RMSNorm has no dbias: DB_PARTIAL is then None and untouched."""
    pid = tl.program_id(0).to(tl.int64)
    first = pid * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, rows)):
        base = row * width
        rstd = tl.load(RSTD + row)
        mean = 0.0
        if not RMS:
            mean = tl.load(MEAN + row)
        dot = tl.zeros([CHUNK], tl.float32)
        gw_sum = tl.zeros([CHUNK], tl.float32)
        sum_sq = tl.zeros([CHUNK], tl.float32)
        for start in range(0, width, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            _, gw, xhat = _grad_chunk(G, X, W, base, cols, cols < width, mean, rstd, weight_offset, HAS_WEIGHT)
            dot += gw * xhat
            gw_sum += gw
            if EPS_MODE != 0:  # the gain depends on the row's norm: recompute its mean square
                mask = cols < width
                centered = tl.where(mask, tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
                sum_sq += centered * centered
        gain = norm_scale * norm_scale
        if EPS_MODE != 0:
            gain = _projection_gain(tl.sum(sum_sq, axis=0) / width, eps, norm_scale, EPS_MODE)
        dot_mean = tl.sum(dot, axis=0) / width * gain
        gw_mean = tl.sum(gw_sum, axis=0) / width
        # The partial rows' loads and stores may get different layouts: other threads of this program stored what
        # a thread reads below for the previous row.
        tl.debug_barrier()
        for start in range(0, width, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            mask = cols < width
            g, gw, xhat = _grad_chunk(G, X, W, base, cols, mask, mean, rstd, weight_offset, HAS_WEIGHT)
            dx = gw - xhat * dot_mean
            if not RMS:
                dx = dx - gw_mean
            tl.store(DX + base + cols, (dx * rstd).to(DX.dtype.element_ty), mask=mask)
            partial = pid * width + cols  # this program's own partial rows
            if HAS_WEIGHT:
                tl.store(DW_PARTIAL + partial, tl.load(DW_PARTIAL + partial, mask=mask) + g * xhat, mask=mask)
            if not RMS:  # RMSNorm has no bias gradient
                tl.store(DB_PARTIAL + partial, tl.load(DB_PARTIAL + partial, mask=mask) + g, mask=mask)


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


def _unit_stride(t: Tensor | None) -> Tensor | None:
    """A weight or bias with unit stride (a copy only when it has another): the kernels index it by column."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


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


def default_row_block(width: int) -> int:
    """The launcher's row block: the whole row (its next power of two) up to MAX_ROW_BLOCK, DEFAULT_CHUNK beyond."""
    block = _block(width)
    return block if block <= MAX_ROW_BLOCK else DEFAULT_CHUNK


def row_block(width: int, requested: int | None = None) -> int:
    """Columns a norm program holds at once: the whole row's block when it fits in `requested` (a power of two;
    None: `default_row_block`), else `requested`, and the row is processed in chunks of that many columns."""
    if requested is None:
        return default_row_block(width)
    if requested < 1 or requested & (requested - 1):
        raise ValueError(f"row_block must be a power of two >= 1, got {requested}")
    return min(requested, _block(width))


def is_chunked(width: int, block: int) -> bool:
    """Whether a row of `width` columns runs the chunked kernels with `block` (from `row_block`) columns per chunk."""
    return block < _block(width)


def _warps(requested: int | None, width: int, block: int) -> int:
    if requested is None:
        return default_warps(block, is_chunked(width, block))
    if not 1 <= requested <= 32 or requested & (requested - 1):
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {requested}")
    return requested


def default_warps(block: int, chunked: bool = False) -> int:
    """Warps per row program: enough threads that a row's BLOCK elements fit in registers without spilling, and no
    more (at 16 warps the register file caps a thread at 128 registers). `tilefuse compile-check` on Triton 3.6
    and 3.9, sm_80 and sm_90: the backward at BLOCK=4096 spills with 4 warps and (3.6) with 16, not with 8; at
    8192 it spills ~200 bytes with 16 warps, not with 32 on sm_90. Chunked rows hold no accumulator that wide: a
    warp per 256 columns of the chunk (16 for 4096: <= 57 registers, and twice the warps in flight of 8 for the
    backward's one program per SM; 32 at chunk 8192 spill 16 bytes on sm_80)."""
    if chunked:
        return max(4, min(32, block // 256))
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
    block: int | None = None,
    eps_mode: str = "mean_square",
    norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """(y, x + residual or None, mean or None (RMSNorm), rstd); mean/rstd are fp32 with shape x.shape[:-1] + (1,).
    `block`: columns a row program holds at once (`row_block`; a row wider than that runs in chunks of it);
    `num_warps` per row program (a power of two <= 32); None: `default_warps` of the block. `eps_mode` and
    `norm_scale`: where eps goes (specs.NormSpec)."""
    mode = eps_mode_code(eps_mode)
    _check_tensor("x", x, x.device)
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)
    if residual is not None:
        _check_tensor("residual", residual, x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has shape {tuple(x.shape)}")
    x2, weight, bias = _rows_view(x), _unit_stride(weight), _unit_stride(bias)
    rows, width = x2.shape
    stat_shape = (*x.shape[:-1], 1)
    total = None
    if residual is not None:
        total = torch.empty_like(x2, dtype=torch.result_type(x, residual))
    y = torch.empty_like(x2, dtype=_out_dtype(total.dtype if total is not None else x.dtype, weight, bias))
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty(rows, dtype=torch.float32, device=x.device)
    block = row_block(width, block)
    if rows > 0:
        res2 = _rows_view(residual) if residual is not None else None
        kernel, sizes = (norm_forward_chunked_kernel, dict(CHUNK=block)) if is_chunked(width, block) else (
            norm_forward_kernel, dict(BLOCK=block))  # fmt: skip
        emit.launch(
            kernel, (rows,), x2, res2, weight, bias, y, total, mean, rstd, width, eps, weight_offset, norm_scale,
            **sizes, RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, EPS_MODE=mode, num_warps=_warps(num_warps, width, block),
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
    block: int | None = None,
    eps: float = 0.0,
    eps_mode: str = "mean_square",
    norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dx in x.dtype, dweight in weight.dtype or None, dbias in fp32 or None for RMSNorm, which has no bias),
    parameter grads reduced over all rows.
    `programs` slices the rows (each program writes one partial dweight/dbias row; None: one per SM), `num_warps`
    and `block` as in the forward; `eps` is read only by eps_mode clamp_norm and add_norm."""
    mode = eps_mode_code(eps_mode)
    _check_tensor("x", x, x.device)
    _check_tensor("grad", grad, x.device)
    if grad.shape != x.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but x has shape {tuple(x.shape)}")
    _check_param("weight", weight, x)
    if not rms and mean is None:
        raise ValueError("mean is required for LayerNorm (rms=False)")
    x2, g2, weight = _rows_view(x), _rows_view(grad), _unit_stride(weight)
    rows, width = x2.shape
    rstd1 = _row_stat("rstd", rstd, rows, x.device)
    mean1 = _row_stat("mean", mean, rows, x.device) if mean is not None and not rms else None
    if programs is not None and programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    programs = max(1, min(rows, programs)) if programs is not None else _backward_programs(rows, x.device)
    rows_per_program = triton.cdiv(rows, programs)
    dx = torch.empty_like(x2)
    dw_partial = torch.zeros(programs, width, dtype=torch.float32, device=x.device)
    db_partial = None if rms else torch.zeros(programs, width, dtype=torch.float32, device=x.device)
    block = row_block(width, block)
    if rows > 0:
        kernel, sizes = (norm_backward_chunked_kernel, dict(CHUNK=block)) if is_chunked(width, block) else (
            norm_backward_kernel, dict(BLOCK=block))  # fmt: skip
        emit.launch(
            kernel, (programs,),
            g2, x2, weight, mean1, rstd1, dx, dw_partial, db_partial, rows, width, weight_offset, rows_per_program,
            eps, norm_scale, **sizes, RMS=rms, HAS_WEIGHT=weight is not None, EPS_MODE=mode,
            num_warps=_warps(num_warps, width, block),
        )  # fmt: skip
    dweight = dw_partial.sum(dim=0).to(weight.dtype) if weight is not None else None
    return dx.view(x.shape), dweight, db_partial.sum(dim=0) if db_partial is not None else None
