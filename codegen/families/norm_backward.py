"""The norm backward (`norm_kernels.norm_backward_triton`): min(rows, programs) programs each reduce cdiv(rows, P)
rows into partial dweight/dbias rows; num_splits is the program count (None: one per SM of an H100)."""

from __future__ import annotations

from typing import NamedTuple

from tilefuse.codegen.kernel_variant import KernelVariant, norm_bwd_chunked_kernel, norm_bwd_kernel
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import NormSpec, eps_mode_code

from .base import F32_BYTES, knobs, pointer_type, spec_rows
from .norm import NormFamily

DEFAULT_NORM_BWD_PROGRAMS = 132  # the launcher uses one program per SM; 132 = an H100 SXM
NORM_BACKWARD_SM_MULTIPLES = (0.5, 1, 2, 4)  # program counts a search tries, in SMs


def _kernel_itemsize(dtype: str) -> int:
    return 4 if dtype.removeprefix("torch.") == "float32" else 2  # norm kernels take float16/bfloat16/float32


class NormBwdCosts(NamedTuple):
    grid: tuple[int]
    read_bytes: int
    write_bytes: int
    flops: int


class NormBackwardFamily(NormFamily):
    name = "norm_backward"
    backward = True
    kernel_source = ("tilefuse.codegen.norm_kernels", "norm_backward_kernel")
    # num_splits: programs of the partial dweight/dbias reduction, multiples of the GPU's SM count (`knob_grid`).
    choices = knobs(num_warps=(1, 2, 4, 8, 16, 32), num_splits=(), block_n=())

    def knob_grid(self, spec: NormSpec, sm_count: int) -> dict[str, tuple[int, ...]]:
        rows = 1
        for dim in spec.shape[:-1]:
            rows *= int(dim or 1)
        splits = {min(rows, max(1, round(sm_count * m))) for m in NORM_BACKWARD_SM_MULTIPLES}
        return super().knob_grid(spec, sm_count) | {"num_splits": tuple(sorted(splits))}

    def costs(self, spec: NormSpec, config: TileConfig) -> NormBwdCosts:
        """A program loads the weight once, then per row dy (in `spec.out_dtype`), x, fp32 rstd (+ mean for
        LayerNorm), and stores dx; at the end it stores one fp32 partial dweight row and, for LayerNorm, one partial
        dbias row (RMSNorm has no bias; the torch sum after them is not counted). Chunked rows read dy, x and the
        weight in both passes of every row and add each row into the fp32 partial dbias (LayerNorm) and, with a
        weight, dweight row: a read and a write of it per row instead of one final store. FLOPs per element: x̂ (2),
        dW and dB sums (3; 2 for RMSNorm), g·w (1), the row dot (2), dx (2) [+ 2 LayerNorm centering]."""
        rows = spec_rows(spec)
        grid = max(1, min(rows, config.num_splits or DEFAULT_NORM_BWD_PROGRAMS))
        es, width, layer = _kernel_itemsize(spec.dtype), spec.width, spec.norm == "layernorm"
        per_row = width * (_kernel_itemsize(spec.out_dtype) + es) + F32_BYTES * (1 + layer)
        weight = width * es if spec.has_weight else 0
        flops = (9 + 3 * layer) * width * rows
        if self.norm_chunked(spec, config):
            partials = width * F32_BYTES * (layer + spec.has_weight)
            read = rows * (2 * (per_row + weight) - F32_BYTES * (1 + layer) + partials)
            return NormBwdCosts((grid,), read, rows * (width * es + partials), flops)
        read = rows * per_row + grid * weight
        write = rows * width * es + grid * (1 + layer) * width * F32_BYTES
        return NormBwdCosts((grid,), read, write, flops)

    def grid(self, spec: NormSpec, config: TileConfig) -> tuple[int, ...]:
        return self.costs(spec, config).grid

    def knob_reasons(self, spec: NormSpec, config: TileConfig) -> list[str]:
        reasons = super().knob_reasons(spec, config)
        if config.num_splits is not None and config.num_splits < 1:
            reasons.append(f"num_splits={config.num_splits} (norm backward programs) < 1")
        return reasons

    def duplicate_reasons(self, spec: NormSpec, config: TileConfig) -> list[str]:
        reasons = super().duplicate_reasons(spec, config)
        rows = spec_rows(spec)
        if not reasons and config.num_splits is not None and config.num_splits > rows:
            return [f"num_splits={config.num_splits} programs for {rows} rows"]
        return reasons

    def variants(self, spec: NormSpec, config: TileConfig) -> tuple[KernelVariant, ...]:
        (programs,) = self.grid(spec, config)
        rows = spec_rows(spec)
        pointers = {n: pointer_type(spec.dtype) for n in ("G", "X", "W", "DX")}
        pointers |= {n: "*fp32" for n in ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL")}
        size, suffix = self.size_consts(spec, config)
        consts = size | {"RMS": spec.norm == "rmsnorm", "HAS_WEIGHT": spec.has_weight,
                         "EPS_MODE": eps_mode_code(spec.eps_mode)}  # fmt: skip
        ints = {"rows": rows, "width": spec.width, "rows_per_program": -(-rows // programs)}
        name = f"{spec.norm}_bwd_width{spec.width}_w{config.num_warps}_p{programs}{suffix}"
        kernel = norm_bwd_chunked_kernel if self.norm_chunked(spec, config) else norm_bwd_kernel
        return (KernelVariant(
            name, kernel, pointers, ("weight_offset", "eps", "norm_scale"), consts, config.num_warps, ints=ints
        ),)  # fmt: skip


NORM_BACKWARD = NormBackwardFamily()
