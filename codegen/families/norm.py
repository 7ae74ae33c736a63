"""The norm forward (`norm_kernels.py`): RMSNorm and LayerNorm, one program per row.

Reads x (+ residual) (+ weight, + bias, once per row), writes y (+ the sum) and the fp32 rstd (+ mean for
LayerNorm). Residual, weight and bias are assumed in `spec.dtype`; y in `spec.out_dtype`. A chunked row
(`norm_chunked`: wider than the row block) reads x again in its second pass (the stored sum, with a residual).
"""

from __future__ import annotations

from typing import Any

from tilefuse.codegen import norm_kernels as kernels
from tilefuse.codegen.kernel_variant import KernelVariant, norm_fwd_chunked_kernel, norm_fwd_kernel
from tilefuse.codegen.launch_configs import LaunchKey, norm_key, shape_rows
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import NormSpec, eps_mode_code

from .base import F32_BYTES, Costs, KernelFamily, PlanCosts, is_pow2, itemsize, knobs, pointer_type, spec_rows

NORM_CHUNKS = (1024, 2048, 4096, 8192)  # chunk columns a norm search tries for rows wider than the chunk


def norm_row_blocks(width: int) -> tuple[int, ...]:
    """Row blocks a norm search tries: the NORM_CHUNKS narrower than the row, and the whole row when it fits in
    `norm_kernels.MAX_ROW_BLOCK` (a wider whole row spills in the backward)."""
    whole = 1 << (width - 1).bit_length()  # the whole row's power-of-two block
    return tuple(c for c in NORM_CHUNKS if c < whole) + ((whole,) if whole <= kernels.MAX_ROW_BLOCK else ())


class NormFamily(KernelFamily[NormSpec]):
    """block_n is the row block (whole row, or chunks of it); num_warps."""

    name = "norm"
    spec_type = NormSpec
    kernel_source = ("tilefuse.codegen.norm_kernels", "norm_forward_kernel")
    choices = knobs(num_warps=(1, 2, 4, 8, 16, 32), block_n=())  # block_n: per Spec (`knob_grid`)

    def knob_grid(self, spec: NormSpec, sm_count: int) -> dict[str, tuple[int, ...]]:
        return dict(self.choices) | {"block_n": norm_row_blocks(spec.width)}

    def default_config(self, spec: NormSpec) -> TileConfig:
        block = kernels.default_row_block(spec.width)
        return TileConfig(block_n=block, num_warps=kernels.default_warps(block, kernels.is_chunked(spec.width, block)))

    def blocks(self, spec: NormSpec, config: TileConfig) -> tuple[int, ...]:
        """(BLOCK,): the row block the launcher uses."""
        return (kernels.row_block(spec.width, config.block_n),)

    def norm_chunked(self, spec: NormSpec, config: TileConfig) -> bool:
        """Whether rows run the chunked kernels (wider than the row block)."""
        return kernels.is_chunked(spec.width, self.blocks(spec, config)[0])

    def grid(self, spec: NormSpec, config: TileConfig) -> tuple[int, ...]:
        return (spec_rows(spec),)

    def costs(self, spec: NormSpec, config: TileConfig) -> PlanCosts:
        """Per row: reads x (twice when chunked) (+ residual, weight, bias), writes y (+ the sum) and the stats.
        FLOPs per element: 1 (residual add) + 2 (square, sum) [+ 2 LayerNorm centering] + 1 (normalize) [+ 1 weight,
        +1 offset, +1 bias]."""
        es, width, rows = itemsize(spec.dtype), spec.width, spec_rows(spec)
        read = width * es * (1 + self.norm_chunked(spec, config) + spec.residual + spec.has_weight + spec.has_bias)
        write = width * itemsize(spec.out_dtype) + F32_BYTES * (1 if spec.norm == "rmsnorm" else 2)
        write += width * es if spec.residual else 0
        per = 3 + spec.residual + 2 * (spec.norm == "layernorm") + spec.has_weight + spec.has_bias
        per += spec.has_weight and spec.weight_offset != 0.0
        return Costs(read * rows, write * rows, per * width * rows)

    def sram_bytes(self, spec: NormSpec, config: TileConfig) -> int:
        """x/y rows in fp32 (2 × BLOCK × 4, + BLOCK × 4 for the residual sum)."""
        return 4 * self.blocks(spec, config)[0] * (2 + spec.residual)

    def knob_reasons(self, spec: NormSpec, config: TileConfig) -> list[str]:
        if not is_pow2(config.block_n):
            return [f"block_n={config.block_n} (norm row block) is not a power of two"]
        return []

    def duplicate_reasons(self, spec: NormSpec, config: TileConfig) -> list[str]:
        block = self.blocks(spec, config)[0]
        if block != config.block_n:
            return [f"block_n={config.block_n} shrinks to the row's block {block}"]
        return []

    def size_consts(self, spec: NormSpec, config: TileConfig) -> tuple[dict[str, Any], str]:
        """(the constexpr holding the row block: BLOCK for whole rows, CHUNK for the chunked kernels; the variant
        name's chunk suffix)."""
        block = self.blocks(spec, config)[0]
        if self.norm_chunked(spec, config):
            return {"CHUNK": block}, f"_c{block}"
        return {"BLOCK": block}, ""

    def variants(self, spec: NormSpec, config: TileConfig) -> tuple[KernelVariant, ...]:
        pointers = {n: pointer_type(spec.dtype) for n in ("X", "RES", "W", "B", "SUM")}
        pointers.update(Y=pointer_type(spec.out_dtype), MEAN="*fp32", RSTD="*fp32")
        size, suffix = self.size_consts(spec, config)
        consts = size | {"RMS": spec.norm == "rmsnorm", "HAS_WEIGHT": spec.has_weight, "HAS_BIAS": spec.has_bias,
                         "HAS_RESIDUAL": spec.residual, "EPS_MODE": eps_mode_code(spec.eps_mode)}  # fmt: skip
        name = f"{spec.norm}_fwd_width{spec.width}_w{config.num_warps}{suffix}"
        kernel = norm_fwd_chunked_kernel if self.norm_chunked(spec, config) else norm_fwd_kernel
        return (KernelVariant(
            name, kernel, pointers, ("eps", "weight_offset", "norm_scale"), consts, config.num_warps,
            ints={"width": spec.width},
        ),)  # fmt: skip

    def launch_key(self, spec: NormSpec) -> LaunchKey | None:
        if not spec.shape:
            return None
        return norm_key(self.name, spec.norm == "rmsnorm", spec.width, shape_rows(spec.shape), spec.dtype,
                        spec.has_weight, spec.has_bias, spec.residual)  # fmt: skip


NORM = NormFamily()
