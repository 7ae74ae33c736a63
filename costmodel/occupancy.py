"""Programs (CTAs) resident per SM, from warps, shared memory and registers — the CUDA occupancy rules.

Registers come from the compiled cubin when compiler features are known, else from an estimate of the plan's
register-resident tiles. Allocation granularities follow the CUDA occupancy calculator: registers are allocated
per warp in units of 256, and each block reserves 1 KiB of shared memory for the system on compute capability 8.0+.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tilefuse.codegen.plan import TiledPlan

from .hardware import GPUSpec

_REG_ALLOC_UNIT = 256  # registers per warp are allocated in multiples of this
_SMEM_RESERVED_PER_BLOCK = 1024
_BASE_REGISTERS = 32  # addresses, loop counters, masks: a rough floor every kernel needs


@dataclass(frozen=True)
class Occupancy:
    programs_per_sm: int  # 0 when one program does not fit
    limited_by: str  # "warps", "blocks", "shared memory", "registers"
    registers: int  # per thread, compiled or estimated
    registers_estimated: bool
    spill_bytes: int  # per thread
    shared_bytes: int  # per program
    reason: str | None = None  # why it cannot run, when programs_per_sm == 0


def estimate_registers(plan: TiledPlan) -> int:
    """Registers per thread the plan's register-resident fp32 tiles need, spread over its threads (uncapped)."""
    threads = launch_warps(plan) * 32
    resident_bytes = plan.sram_bytes - plan.smem_bytes  # fp32 accumulators, scores, row statistics
    return _BASE_REGISTERS + math.ceil(resident_bytes / 4 / threads)


def launch_warps(plan: TiledPlan) -> int:
    """Warps per program as launched: the config's, for every family."""
    return plan.config.num_warps


def occupancy(
    plan: TiledPlan,
    gpu: GPUSpec,
    *,
    registers: int | None = None,
    spill_bytes: int | None = None,
    shared_bytes: int | None = None,
) -> Occupancy:
    """Resident programs per SM for `plan` on `gpu`. Compiled facts (registers, spill bytes, shared bytes) override
    the plan's estimates when given."""
    num_warps = launch_warps(plan)
    estimated = registers is None
    regs = estimate_registers(plan) if registers is None else registers
    spill = spill_bytes if spill_bytes is not None else max(0, regs - gpu.max_registers_per_thread) * 4
    regs = min(regs, gpu.max_registers_per_thread)
    smem = plan.smem_bytes if shared_bytes is None else shared_bytes
    if num_warps * 32 > 1024:
        return Occupancy(0, "warps", regs, estimated, spill, smem, f"{num_warps} warps exceed 1024 threads")
    if smem > gpu.smem_per_block_bytes:
        reason = f"needs {smem} B of shared memory, {gpu.name} allows {gpu.smem_per_block_bytes} B per program"
        return Occupancy(0, "shared memory", regs, estimated, spill, smem, reason)
    per_warp = math.ceil(regs * 32 / _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    limits = {
        "warps": gpu.max_warps_per_sm // num_warps,
        "blocks": gpu.max_blocks_per_sm,
        "shared memory": gpu.smem_per_sm_bytes // (smem + _SMEM_RESERVED_PER_BLOCK) if smem else gpu.max_blocks_per_sm,
        "registers": gpu.registers_per_sm // per_warp // num_warps,
    }
    limited_by = min(limits, key=lambda name: limits[name])
    count = limits[limited_by]
    why = None if count else f"one program does not fit an SM ({limited_by})"
    return Occupancy(count, limited_by, regs, estimated, spill, smem, why)
