"""The analytic model moves the right way: more bytes cost more, causal skipping pays at long sequences, a wave
that spills over by one program costs a step, infeasible configs rank last, compiled facts change occupancy."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tilefuse.codegen.families import default_config
from tilefuse.codegen.plan import TiledPlan
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.costmodel.analytic import predict, rank
from tilefuse.costmodel.features import KernelFeatures
from tilefuse.costmodel.hardware import get_gpu
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec

H100 = get_gpu("h100")


def _attention(n: int, causal: bool = False, d: int = 128) -> AttentionSpec:
    return AttentionSpec(
        batch=2, q_heads=16, kv_heads=16, q_len=n, kv_len=n, head_dim=d, v_head_dim=d, dtype="bfloat16",
        scale=d**-0.5, causal=causal,
    )  # fmt: skip


def _norm(rows: int, width: int = 4096) -> TiledPlan:
    """An RMSNorm plan at the launcher's defaults (whole rows up to 8192 columns, chunked beyond)."""
    spec = NormSpec("rmsnorm", width, (rows, width), "bfloat16", 1e-6, out_dtype="bfloat16")
    return TiledPlan(spec, default_config(spec))


@pytest.mark.parametrize("rows", [1024, 8192])
def test_more_bytes_is_slower(rows: int) -> None:
    narrow, wide = predict(_norm(rows, 2048), H100), predict(_norm(rows, 8192), H100)
    assert narrow.bound == wide.bound == "memory"
    assert narrow.latency_us < wide.latency_us
    slow_gpu = predict(_norm(rows, 8192), get_gpu("a100-40gb"))
    assert slow_gpu.latency_us > wide.latency_us  # same bytes, less bandwidth


def test_causal_is_faster_than_full_at_long_sequences() -> None:
    config = TileConfig(128, 64, 8, 2)
    full = predict(TiledPlan(_attention(8192), config), H100)
    causal = predict(TiledPlan(_attention(8192, causal=True), config), H100)
    assert full.bound == "compute"
    assert 0.45 < causal.latency_us / full.latency_us < 0.65  # about half the key blocks are skipped


def test_wave_quantization_step() -> None:
    probe = predict(_norm(1), H100)
    slots = H100.sm_count * probe.programs_per_sm
    full = predict(_norm(4 * slots), H100)
    over = predict(_norm(4 * slots + 1), H100)
    fewer = predict(_norm(4 * slots - 1), H100)
    assert (full.waves, over.waves) == (4, 5)
    assert over.latency_us - full.latency_us > 10 * (full.latency_us - fewer.latency_us)


@pytest.mark.parametrize("family", ["norm", "norm_backward"])
def test_chunked_rows_rereads_count_as_l2_hits(family: str) -> None:
    """A chunked row issues more bytes than a whole one (its second pass; the backward's partial-row updates), but
    they hit L2: DRAM time does not grow with them (the backward's L2 traffic still may bound it)."""
    spec = NormSpec("rmsnorm", 8192, (4096, 8192), "bfloat16", 1e-6, has_weight=True, out_dtype="bfloat16")
    whole, chunked = (TiledPlan(spec, TileConfig(block_n=block, num_warps=16), family) for block in (8192, 4096))
    assert chunked.norm_chunked and not whole.norm_chunked
    assert chunked.hbm_read_bytes > whole.hbm_read_bytes
    fast, slow = predict(whole, H100), predict(chunked, H100)
    assert slow.memory_us <= 1.1 * fast.memory_us
    assert fast.latency_us <= slow.latency_us <= (1.1 if family == "norm" else 3.0) * fast.latency_us


def test_infeasible_config_ranks_last_with_a_reason() -> None:
    spec = _attention(2048)
    configs = [TileConfig(256, 256, 8, 4), TileConfig(128, 64, 8, 2), TileConfig(64, 64, 4, 2)]
    ranked = rank(spec, configs, H100)
    assert [r.config for r in ranked][-1] == configs[0]
    assert not ranked[-1].estimate.feasible and math.isinf(ranked[-1].estimate.latency_us)
    assert "shared memory" in (ranked[-1].estimate.reason or "")
    assert all(r.estimate.feasible for r in ranked[:-1])
    with pytest.raises(ValueError, match="configs"):
        rank(spec, [], H100)


def test_compiled_facts_override_estimates() -> None:
    plan = TiledPlan(_attention(4096), TileConfig(64, 32, 4, 1))
    base = dict(kernel="k", arch="sm_90", num_warps=4, num_stages=1, shared_bytes=plan.smem_bytes)
    lean = predict(plan, H100, KernelFeatures(status="ok", registers=64, spill_bytes=0, **base))
    fat = predict(plan, H100, KernelFeatures(status="ok", registers=255, spill_bytes=512, **base))
    assert not lean.registers_estimated and lean.programs_per_sm > fat.programs_per_sm
    assert fat.latency_us > lean.latency_us
    failed = predict(plan, H100, KernelFeatures(status="infeasible", reason="ptxas: out of registers", **base))
    assert not failed.feasible and failed.reason == "ptxas: out of registers"


def test_breakdown_is_self_consistent() -> None:
    estimate = predict(TiledPlan(RopeSpec("rotate_half", 128, 128, (4, 32, 2048, 128), "bfloat16")), H100)
    data = estimate.to_dict()
    assert data["feasible"] and data["bound"] == "memory"
    assert estimate.latency_us >= estimate.launch_us + estimate.memory_us
    assert 0 < estimate.wave_efficiency <= 1
    plan = TiledPlan(dataclasses.replace(_attention(1024), dtype="float32"), TileConfig(64, 32, 4, 1))
    bf16 = TiledPlan(_attention(1024), TileConfig(64, 32, 4, 1))
    assert predict(plan, H100).compute_us > predict(bf16, H100).compute_us  # fp32 runs on CUDA cores
