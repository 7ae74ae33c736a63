"""Search spaces: hard constraints are filtered before anything is suggested."""

from __future__ import annotations

import dataclasses

import pytest

from tilefuse.autotune.space import (
    ATTENTION_CHOICES,
    build_space,
    config_from_dict,
    config_to_dict,
    default_config,
    infeasible_reasons,
)
from tilefuse.codegen.plan import TileConfig, TiledPlan
from tilefuse.costmodel.features import KernelFeatures
from tilefuse.costmodel.hardware import get_gpu
from tilefuse.specs import AttentionSpec, NormSpec

H100, L4 = get_gpu("h100"), get_gpu("l4")


def attention(q_len: int = 1024, head_dim: int = 128, **kw: object) -> AttentionSpec:
    return AttentionSpec(2, 8, 8, q_len, q_len, head_dim, head_dim, "bfloat16", 0.125, **kw)  # type: ignore[arg-type]


def test_every_config_in_the_space_is_feasible_and_the_rest_say_why() -> None:
    space = build_space(attention(), H100)
    assert space.tunable and space.rejected
    for config in space.configs:
        assert infeasible_reasons(space.spec, config, H100) == []
        assert TiledPlan(space.spec, config).smem_bytes <= H100.smem_per_block_bytes
    for item in space.rejected:
        assert item.reasons and item.config not in space


def test_shared_memory_limit_depends_on_the_gpu() -> None:
    big = TileConfig(256, 128, 8, 4)
    assert big not in build_space(attention(), L4)
    assert any("shared memory" in r for r in infeasible_reasons(attention(), big, L4))
    assert len(build_space(attention(), L4).configs) < len(build_space(attention(), H100).configs)


@pytest.mark.parametrize("q_len", [1, 17, 40])
def test_blocks_the_launcher_would_shrink_are_not_separate_configs(q_len: int) -> None:
    space = build_space(attention(q_len=q_len, head_dim=64), H100)
    for config in space.configs:
        assert TiledPlan(space.spec, config).blocks[:2] == (config.block_m, config.block_n)
    assert {c.block_m for c in space.configs} <= {b for b in ATTENTION_CHOICES["block_m"] if b < 2 * max(q_len, 16)}


def test_head_dim_beyond_the_kernel_has_no_config() -> None:
    with pytest.raises(ValueError, match="no feasible tile config"):
        build_space(attention(head_dim=512), H100)


def test_dynamic_dims_cannot_build_a_space() -> None:
    with pytest.raises(ValueError, match="static shapes"):
        build_space(dataclasses.replace(attention(), q_len=None, kv_len=None), H100)


def test_compiler_facts_reject_spills_and_compile_failures() -> None:
    spec, config = attention(), TileConfig(64, 64, 4, 2)
    spills = KernelFeatures("k", "sm_90", "ok", 4, 2, registers=255, spill_bytes=96, shared_bytes=1024)
    failed = KernelFeatures("k", "sm_90", "infeasible", 4, 2, reason="out of resource")
    assert any("spills" in r for r in infeasible_reasons(spec, config, H100, spills))
    assert any("out of resource" in r for r in infeasible_reasons(spec, config, H100, failed))
    space = build_space(spec, H100, features={config: spills})
    assert config not in space


def test_norm_sites_have_the_launchers_single_config() -> None:
    spec = NormSpec("rmsnorm", 64, (2, 16, 64), "bfloat16", 1e-6)
    space = build_space(spec, H100)
    assert space.configs == (default_config(spec),) and not space.tunable


def test_config_dict_round_trip_and_validation() -> None:
    config = TileConfig(128, 32, 8, 3)
    assert config_from_dict(config_to_dict(config)) == config
    with pytest.raises(ValueError, match="keys"):
        config_from_dict({"block_m": 64})
    with pytest.raises(ValueError, match="num_warps"):
        config_from_dict({"block_m": 64, "block_n": 64, "num_warps": "4", "num_stages": 2})
