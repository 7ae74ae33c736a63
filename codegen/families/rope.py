"""RoPE (`rope_kernels.py`): grid cdiv(rows, BLOCK_ROWS). Per row: reads head_dim elements of x and rotary_dim of
cos and of sin (cos/sin assumed in `spec.dtype`), writes head_dim elements of y. The backward runs the same kernel
with the same knobs, so RoPE has no backward family."""

from __future__ import annotations

import math

import triton

from tilefuse.codegen.kernel_variant import KernelVariant, rope_kernel
from tilefuse.codegen.launch_configs import LaunchKey, rope_key, shape_rows
from tilefuse.codegen.rope_kernels import DEFAULT_BLOCK_ROWS, DEFAULT_WARPS
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import RopeSpec, rope_layout_code

from .base import Costs, KernelFamily, PlanCosts, is_pow2, itemsize, knobs, pointer_type, spec_rows


class RopeFamily(KernelFamily[RopeSpec]):
    """block_m is the rows per program; num_warps."""

    name = "rope"
    spec_type = RopeSpec
    kernel_source = ("tilefuse.codegen.rope_kernels", "rope_kernel")
    choices = knobs(block_m=(1, 2, 4, 8, 16, 32, 64), num_warps=(1, 2, 4, 8))

    def default_config(self, spec: RopeSpec) -> TileConfig:
        return TileConfig(block_m=DEFAULT_BLOCK_ROWS, num_warps=DEFAULT_WARPS)

    def blocks(self, spec: RopeSpec, config: TileConfig) -> tuple[int, ...]:
        """(BLOCK_ROWS, BLOCK_HALF, BLOCK_TAIL)."""
        half, tail = spec.rotary_dim // 2, spec.head_dim - spec.rotary_dim
        return (config.block_m, int(triton.next_power_of_2(half)), int(triton.next_power_of_2(max(tail, 1))))

    def grid(self, spec: RopeSpec, config: TileConfig) -> tuple[int, ...]:
        return (-(-spec_rows(spec) // config.block_m),)

    def costs(self, spec: RopeSpec, config: TileConfig) -> PlanCosts:
        """Per row: reads x, cos and sin, writes y; 3 FLOPs per rotated element."""
        es, rows = itemsize(spec.dtype), spec_rows(spec)
        read = rows * (spec.head_dim * es + 2 * spec.rotary_dim * es)
        return Costs(read, rows * spec.head_dim * es, 3 * spec.rotary_dim * rows)

    def sram_bytes(self, spec: RopeSpec, config: TileConfig) -> int:
        """6 fp32 [BR, BH] operand tiles (x1, x2, c1, c2, s1, s2) + the tail tile in the input dtype."""
        br, bh, bt = self.blocks(spec, config)
        return br * (6 * bh * 4 + bt * itemsize(spec.dtype))

    def knob_reasons(self, spec: RopeSpec, config: TileConfig) -> list[str]:
        if not is_pow2(config.block_m):
            return [f"block_m={config.block_m} (RoPE rows per program) is not a power of two"]
        return []

    def duplicate_reasons(self, spec: RopeSpec, config: TileConfig) -> list[str]:
        rows = spec_rows(spec)
        if config.block_m > 1 and config.block_m // 2 >= rows:
            return [f"block_m={config.block_m} rows per program for {rows} rows"]
        return []

    def variants(self, spec: RopeSpec, config: TileConfig) -> tuple[KernelVariant, ...]:
        block_rows, block_half, block_tail = self.blocks(spec, config)
        pointers = {n: pointer_type(spec.dtype) for n in ("X", "COS", "SIN", "Y")}
        consts = dict(
            BLOCK_ROWS=block_rows, BLOCK_HALF=block_half, BLOCK_TAIL=block_tail, LAYOUT=rope_layout_code(spec.layout),
            BACKWARD=False, HAS_TAIL=spec.rotary_dim < spec.head_dim,
        )  # fmt: skip
        ints = self.launch_ints(spec)
        name = f"rope_{spec.layout}_d{spec.head_dim}_r{spec.rotary_dim}_rows{block_rows}_w{config.num_warps}"
        return (KernelVariant(
            name, rope_kernel, pointers, (), consts, config.num_warps, ints=ints
        ),)  # fmt: skip

    @staticmethod
    def launch_ints(spec: RopeSpec) -> dict[str, int]:
        """The launcher's integer arguments for x of `spec.shape` (leading dims padded to [B, H, N]) and an
        [N, rotary_dim] cos/sin table broadcast over B and H (the Spec does not record the table's shape)."""
        lead = (1,) * (4 - len(spec.shape)) + tuple(int(d or 1) for d in spec.shape[:-1])
        ints = {"rows": math.prod(lead), "dim1": lead[1], "dim2": lead[2], "head_dim": spec.head_dim,
                "half": spec.rotary_dim // 2}  # fmt: skip
        for table in ("cos", "sin"):
            ints |= {f"{table}_s{i}": stride for i, stride in enumerate((0, 0, spec.rotary_dim, 1))}
        return ints

    def launch_key(self, spec: RopeSpec) -> LaunchKey | None:
        if not spec.shape:
            return None
        return rope_key(rope_layout_code(spec.layout), spec.head_dim, spec.rotary_dim, shape_rows(spec.shape),
                        spec.dtype)  # fmt: skip


ROPE = RopeFamily()
