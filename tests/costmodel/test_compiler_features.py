"""Compiler features on CPU: the TTGIR of an sm_90 attention build walked through the MLIR wrapper, the on-disk
feature cache, and an over-sized config recorded as infeasible rather than raised.

Each sm_90 compile takes seconds; under TRITON_INTERPRET=1 (set by other test modules) it runs in a child process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tilefuse.codegen.plan import TileConfig, TiledPlan
from tilefuse.costmodel.cache import FeatureCache
from tilefuse.costmodel.features import KernelFeatures, plan_features
from tilefuse.costmodel.mlir import parse_module
from tilefuse.specs import AttentionSpec

SPEC = AttentionSpec(
    batch=2, q_heads=8, kv_heads=8, q_len=1024, kv_len=1024, head_dim=64, v_head_dim=64, dtype="bfloat16",
    scale=0.125, causal=True,
)  # fmt: skip

_TTGIR = """
module attributes {"ttg.num-warps" = 4 : i32} {
  tt.func public @k(%p: !tt.ptr<f32>) {
    %0 = tt.splat %p : !tt.ptr<f32> -> tensor<16x!tt.ptr<f32>>
    %1 = tt.load %0 : tensor<16x!tt.ptr<f32>>
    %2 = math.exp2 %1 : tensor<16xf32>
    tt.store %0, %2 : tensor<16x!tt.ptr<f32>>
    tt.return
  }
}
"""


def _features(config: TileConfig, cache: FeatureCache) -> KernelFeatures:
    features = plan_features(TiledPlan(SPEC, config), "sm_90", cache)
    if not features.ok and "ptxas" in (features.reason or ""):
        pytest.skip(f"the CUDA toolchain shipped with triton is unusable here: {features.reason}")
    return features


def test_mlir_wrapper_walks_a_module() -> None:
    module = parse_module(_TTGIR)
    counts = module.op_counts()
    assert counts["tt.load"] == counts["tt.store"] == counts["math.exp2"] == 1
    assert module.attributes["ttg.num-warps"] == 4
    (load,) = module.find("tt.load")
    assert load.result_shape() == (16,) and load.dialect == "tt"
    with pytest.raises(ValueError, match="does not parse"):
        parse_module("this is not mlir")


def test_attention_features_and_cache_hit(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    config = TileConfig(64, 64, 4, 2)
    features = _features(config, cache)
    assert features.ok, features.reason
    counts = features.counts
    # Two loop bodies (key blocks needing no mask, then the masked ones), each QK^T and PV as warp-group MMAs.
    assert counts["dots"] == 4 and counts["wgmma"] == 4 and counts["loops"] == 2
    assert counts["loads"] + counts["async_copies"] > 0 and counts["stores"] == 2  # O and lse
    assert counts["exps"] >= 4 and counts["reductions"] >= 4
    assert features.dot_flops == 2 * 2 * 2 * 64 * 64 * 64  # two 64x64x64 dots per loop body
    assert 0 < (features.registers or 0) <= 255 and features.spill_bytes == 0
    assert (features.shared_bytes or 0) >= TiledPlan(SPEC, config).smem_bytes
    assert (cache.hits, cache.misses) == (0, 1) and len(list(tmp_path.glob("*.json"))) == 1
    again = _features(config, cache)
    assert again == features and cache.hits == 1


def test_oversized_tile_is_recorded_as_infeasible(tmp_path: Path) -> None:
    config = TileConfig(64, 128, 4, 8)  # eight stages of 128-row K/V tiles: > 227 KiB of shared memory
    assert TiledPlan(SPEC, config).smem_bytes > 227 * 1024
    features = _features(config, FeatureCache(tmp_path))
    assert features.status == "infeasible" and "shared memory" in (features.reason or "")
    assert KernelFeatures.from_dict(features.to_dict()) == features
