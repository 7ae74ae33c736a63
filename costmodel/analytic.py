"""Analytic latency model of a TiledPlan on a GPU: a roofline per program, scheduled in waves over the SMs.

Per program, compute time (tensor-core FLOPs at the dtype's peak + softmax exp2 on the MUFU + elementwise fp32 work,
serialized as in a FlashAttention-2 style kernel) races memory time (DRAM bytes at HBM bandwidth, all issued bytes at
an L2 bandwidth); each is slowed by how well the resident warps keep the units busy (occupancy). Programs run in
waves of `SMs × programs per SM`; the last, partial wave runs fewer programs per SM. Causal/window block skipping is
in the plan's visited key blocks. Constants marked "estimate" are not vendor figures: the learned model (trained on
measurements) is meant to replace this one where data exists; this one is the default without data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from tilefuse.codegen.families.base import itemsize
from tilefuse.codegen.plan import TiledPlan
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec

from .features import KernelFeatures
from .hardware import GPUSpec
from .occupancy import Occupancy, launch_warps, occupancy

LAUNCH_OVERHEAD_US = 3.0  # estimate: host launch + front end of one Triton kernel
PROGRAM_LATENCY_US = 1.2  # estimate: pipeline fill + drain of a launch (~2 DRAM round trips)
DRAM_LATENCY_NS = 600.0  # estimate: bytes in flight needed per SM = its bandwidth share × this latency
L2_BANDWIDTH_FACTOR = 3.0  # estimate: L2 bandwidth as a multiple of HBM bandwidth
WARPS_TO_FEED_TENSOR_CORES = 4  # one warp per SM sub-partition keeps all four tensor cores issuing
SIMT_FLOPS_PER_SCORE = 6  # scale, max, subtract, row sum, rescale, select per attention score (fp32, CUDA cores)


@dataclass(frozen=True)
class Work:
    """What the whole launch does. `inflight_bytes`: bytes one program keeps in flight (its pipelined loads)."""

    programs: int
    mma_flops: float  # on padded tiles, as the tensor cores execute them
    sfu_ops: float
    simt_flops: float
    issued_bytes: float  # every program's loads and stores (the plan's convention)
    dram_bytes: float  # after L2 reuse of re-read tiles
    inflight_bytes: float
    iterations: float  # mean loop iterations per program
    longest_over_mean: float  # the slowest program's work / the mean


@dataclass(frozen=True)
class LatencyEstimate:
    latency_us: float  # math.inf when infeasible
    feasible: bool
    reason: str | None
    bound: str  # "compute", "memory", "infeasible"
    compute_us: float  # whole launch at 100% efficiency, for the breakdown
    memory_us: float
    launch_us: float
    programs: int
    programs_per_sm: int
    occupancy_limited_by: str
    waves: int
    wave_efficiency: float  # programs / (waves × slots)
    compute_efficiency: float  # at full occupancy
    memory_efficiency: float
    registers: int
    registers_estimated: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _attention_work(plan: TiledPlan, spec: AttentionSpec, gpu: GPUSpec, slots: int) -> Work:
    bm, bn, bd, bdv = plan.blocks
    rows_of_blocks, heads = plan.grid
    visited = [len(plan.key_blocks_per_program(m)) for m in range(rows_of_blocks)]
    blocks = sum(visited) * heads
    es = itemsize(spec.dtype)
    issued = plan.hbm_read_bytes + plan.hbm_write_bytes
    b, hkv = int(spec.batch or 1), int(spec.kv_heads or 1)
    nk = int(spec.kv_len or 1)
    kv_head_bytes = nk * (spec.head_dim + spec.v_head_dim) * es
    unique_kv = b * hkv * kv_head_bytes
    rereads = max(0.0, plan.hbm_read_bytes - unique_kv - spec.head_dim * es * int(spec.q_len or 1) * heads)
    # Query blocks of a head run side by side (grid dim 0 varies fastest), so K/V re-reads hit L2 when the K/V of
    # the heads in flight fit in it (half of L2: the rest holds Q/O streams and other traffic).
    heads_in_flight = math.ceil(min(slots, plan.grid[0] * heads) / rows_of_blocks / max(spec.gqa_group, 1))
    working_set = heads_in_flight * kv_head_bytes
    hit = 1.0 if working_set <= gpu.l2_bytes / 2 else gpu.l2_bytes / 2 / working_set
    per_iteration = bn * (spec.head_dim + spec.v_head_dim) * es + (bm * bn if spec.mask != "none" else 0)
    mean_visited = sum(visited) / max(len(visited), 1)
    return Work(
        programs=rows_of_blocks * heads,
        mma_flops=blocks * 2.0 * bm * bn * (bd + bdv),
        sfu_ops=blocks * (bm * bn + bm),
        simt_flops=blocks * SIMT_FLOPS_PER_SCORE * bm * bn,
        issued_bytes=issued,
        dram_bytes=issued - rereads * hit,
        inflight_bytes=per_iteration * max(1, plan.config.num_stages - 1),
        iterations=mean_visited,
        longest_over_mean=max(visited) / mean_visited if mean_visited else 1.0,
    )


def _rowwise_work(plan: TiledPlan, spec: NormSpec | RopeSpec) -> Work:
    """Norm and RoPE: uniform programs that stream their rows once, elementwise work on the CUDA cores. Parameters
    every row re-reads (norm weight/bias, RoPE cos/sin rows) stay in L2 after their first read, and so do a chunked
    norm row's second pass and partial rows (`_norm_rereads`)."""
    programs, es = plan.grid[0], itemsize(spec.dtype)
    issued = plan.hbm_read_bytes + plan.hbm_write_bytes
    rows = math.prod(int(d or 1) for d in spec.shape[:-1])
    if isinstance(spec, NormSpec):
        rereads, sfu = _norm_rereads(plan, spec, rows), float(rows)
    else:
        table_rows = int(spec.shape[-2] or 1) if len(spec.shape) >= 2 else rows
        rereads, sfu = max(0, rows - table_rows) * 2 * spec.rotary_dim * es, 0.0
    return Work(programs, 0.0, sfu, float(plan.flops), issued, issued - rereads, plan.hbm_read_bytes / programs,
                1.0, 1.0)  # fmt: skip


def _norm_rereads(plan: TiledPlan, spec: NormSpec, rows: int) -> int:
    """Bytes a norm launch re-reads while they are in L2. Forward: the weight and bias every row reads, and a chunked
    row's second pass over x (or the stored sum). Backward: the weight (once per program; twice per row chunked) and,
    chunked, each row's second pass over dy and x and the read-modify-writes of the program's partial rows."""
    es, width = itemsize(spec.dtype), spec.width
    if plan.kernel_family == "norm":
        return (rows - 1) * width * es * (spec.has_weight + spec.has_bias) + plan.norm_chunked * rows * width * es
    weight = width * es * spec.has_weight
    if not plan.norm_chunked:
        return (plan.grid[0] - 1) * weight
    partials = width * 4 * (1 + spec.has_weight)
    return (2 * rows - 1) * weight + rows * (width * (itemsize(spec.out_dtype) + es) + 2 * partials)


def plan_work(plan: TiledPlan, gpu: GPUSpec, slots: int) -> Work:
    """The launch's work; `slots` (SMs × programs per SM) sets how many K/V heads share L2 at once."""
    spec = plan.spec
    if isinstance(spec, AttentionSpec):
        return _attention_work(plan, spec, gpu, slots)
    if isinstance(spec, NormSpec | RopeSpec):
        return _rowwise_work(plan, spec)
    raise TypeError(f"no analytic model for {type(spec).__name__}")


def _mma_shape_efficiency(plan: TiledPlan, gpu: GPUSpec) -> float:
    """Blocks smaller than one tensor-core instruction's M (64 for Hopper wgmma, 16 for mma.sync) waste it."""
    if not isinstance(plan.spec, AttentionSpec):
        return 1.0
    mma_m = 64 if gpu.compute_capability >= (9, 0) and plan.config.num_warps >= 4 else 16
    return min(1.0, plan.blocks[0] / mma_m)


def _wave_time_us(work: Work, occ: Occupancy, gpu: GPUSpec, plan: TiledPlan, resident: int) -> tuple[float, ...]:
    """(time of one wave with `resident` programs per SM, compute efficiency, memory efficiency), µs."""
    sms, programs = gpu.sm_count, work.programs
    warps = resident * launch_warps(plan)
    compute_eff = min(1.0, warps / WARPS_TO_FEED_TENSOR_CORES) * _mma_shape_efficiency(plan, gpu)
    bytes_per_sm_per_ns = gpu.hbm_bytes_per_s / sms / 1e9
    memory_eff = min(1.0, resident * work.inflight_bytes / (bytes_per_sm_per_ns * DRAM_LATENCY_NS))
    dtype = plan.spec.dtype
    mma_rate = gpu.peak_flops(dtype, tensor_core=not dtype.endswith("float32")) / sms
    compute_s = work.mma_flops / mma_rate + work.sfu_ops / (gpu.sfu_ops_per_s / sms)
    compute_s += work.simt_flops / (gpu.peak_flops("float32", tensor_core=False) / sms)
    spill_bytes = 2.0 * occ.spill_bytes * launch_warps(plan) * 32 * work.iterations * programs
    dram_s = work.dram_bytes / (gpu.hbm_bytes_per_s / sms)
    l2_s = (work.issued_bytes + spill_bytes) / (gpu.hbm_bytes_per_s * L2_BANDWIDTH_FACTOR / sms)
    per_program_s = max(compute_s / compute_eff, dram_s / memory_eff, l2_s / memory_eff) / programs
    return resident * per_program_s * 1e6, compute_eff, memory_eff


def predict(plan: TiledPlan, gpu: GPUSpec, features: KernelFeatures | None = None) -> LatencyEstimate:
    """Predicted latency of launching `plan` on `gpu`, with its breakdown. Compiler `features` (registers, spills,
    shared memory, feasibility) replace the plan's estimates when given."""
    if not isinstance(plan, TiledPlan):
        raise TypeError(f"plan must be a TiledPlan, got {type(plan).__name__}")
    if features is not None and not features.ok:
        return _infeasible(plan, features.reason or "compile failed", occupancy(plan, gpu))
    compiled = features or KernelFeatures("", "", "ok", 0, 0)  # an empty record: every fact unknown
    occ = occupancy(
        plan, gpu, registers=compiled.registers, spill_bytes=compiled.spill_bytes, shared_bytes=compiled.shared_bytes
    )
    reasons = plan.infeasible_reasons(gpu.target()) or ([occ.reason] if occ.reason else [])
    if reasons:
        return _infeasible(plan, "; ".join(reasons), occ)
    sms, per_sm = gpu.sm_count, occ.programs_per_sm
    slots = sms * per_sm
    work = plan_work(plan, gpu, slots)
    full_waves, remainder = divmod(work.programs, slots)
    wave_full, compute_eff, memory_eff = _wave_time_us(work, occ, gpu, plan, per_sm)
    total = full_waves * wave_full
    if remainder:
        total += _wave_time_us(work, occ, gpu, plan, math.ceil(remainder / sms))[0]
    # Latency within a wave is hidden by the resident programs (the memory efficiency term); the pipeline fill and
    # drain of the whole launch is not. No launch is faster than its slowest program run alone.
    total = max(total, _wave_time_us(work, occ, gpu, plan, 1)[0] * work.longest_over_mean) + PROGRAM_LATENCY_US
    dtype = plan.spec.dtype
    compute_us = work.mma_flops / gpu.peak_flops(dtype, tensor_core=not dtype.endswith("float32")) * 1e6
    compute_us += work.sfu_ops / gpu.sfu_ops_per_s * 1e6 + work.simt_flops / gpu.peak_flops("float32", False) * 1e6
    memory_us = work.dram_bytes / gpu.hbm_bytes_per_s * 1e6
    waves = full_waves + (1 if remainder else 0)
    return LatencyEstimate(
        latency_us=LAUNCH_OVERHEAD_US + total, feasible=True, reason=None,
        bound="compute" if compute_us / compute_eff >= memory_us / memory_eff else "memory",
        compute_us=compute_us, memory_us=memory_us, launch_us=LAUNCH_OVERHEAD_US, programs=work.programs,
        programs_per_sm=per_sm, occupancy_limited_by=occ.limited_by, waves=waves,
        wave_efficiency=work.programs / (waves * slots), compute_efficiency=compute_eff,
        memory_efficiency=memory_eff, registers=occ.registers, registers_estimated=occ.registers_estimated,
    )  # fmt: skip


def _infeasible(plan: TiledPlan, reason: str, occ: Occupancy) -> LatencyEstimate:
    programs = math.prod(plan.grid)
    return LatencyEstimate(
        math.inf, False, reason, "infeasible", 0.0, 0.0, LAUNCH_OVERHEAD_US, programs, 0, occ.limited_by, 0, 0.0,
        0.0, 0.0, occ.registers, occ.registers_estimated,
    )  # fmt: skip


@dataclass(frozen=True)
class RankedConfig:
    config: TileConfig
    estimate: LatencyEstimate


def rank(
    spec: AttentionSpec | NormSpec | RopeSpec,
    configs: Sequence[TileConfig],
    gpu: GPUSpec,
    features: Mapping[TileConfig, KernelFeatures] | None = None,
) -> list[RankedConfig]:
    """`configs` fastest first by predicted latency; infeasible ones last (in input order). Ties keep input order."""
    if not configs:
        raise ValueError("configs must be a non-empty sequence of TileConfig")
    features = features or {}
    ranked = [RankedConfig(c, predict(TiledPlan(spec, c), gpu, features.get(c))) for c in configs]
    return sorted(ranked, key=lambda r: r.estimate.latency_us)
