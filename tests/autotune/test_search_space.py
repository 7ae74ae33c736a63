"""Search spaces: hard constraints are filtered before anything is suggested."""

from __future__ import annotations

import dataclasses

import pytest

from tilefuse.codegen.families import FAMILIES, KERNEL_FAMILIES, default_config, plan_for, site_families, spec_families
from tilefuse.codegen.families.norm_backward import NORM_BACKWARD_SM_MULTIPLES
from tilefuse.codegen.plan import TiledPlan
from tilefuse.codegen.tile_config import HEURISTIC_SPLITS, PARAMS, TileConfig, config_from_dict, config_to_dict
from tilefuse.costmodel.features import KernelFeatures
from tilefuse.costmodel.hardware import GPUSpec, get_gpu
from tilefuse.costmodel.space import build_space, infeasible_reasons
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

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
    assert {c.block_m for c in space.configs} <= {
        b for b in FAMILIES["attention"].choices["block_m"] if b < 2 * max(q_len, 16)
    }


def test_head_dim_beyond_the_kernel_has_no_config() -> None:
    with pytest.raises(ValueError, match="no feasible attention tile config"):
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


PREFILL = attention(q_len=256, head_dim=64)
DECODE = AttentionSpec(4, 32, 8, 1, 4096, 128, 128, "bfloat16", 0.125, gqa_group=4)
NORM = NormSpec("rmsnorm", 4096, (2, 128, 4096), "bfloat16", 1e-6)
ROPE = RopeSpec("rotate_half", 128, 128, (2, 32, 128, 128), "bfloat16")
FAMILY_SPECS = [(PREFILL, "attention"), (DECODE, "attention_decode"), (PREFILL, "attention_backward"),
                (NORM, "norm"), (NORM, "norm_backward"), (ROPE, "rope")]  # fmt: skip


def test_each_site_launches_its_families() -> None:
    assert site_families(PREFILL) == ("attention", "attention_backward")
    assert site_families(DECODE) == ("attention_decode", "attention_backward")
    assert site_families(NORM) == ("norm", "norm_backward") and site_families(ROPE) == ("rope",)
    assert set(KERNEL_FAMILIES) == {k for s in (PREFILL, NORM, ROPE) for k in spec_families(s)}


@pytest.mark.parametrize(("spec", "kind"), FAMILY_SPECS, ids=[kind for _, kind in FAMILY_SPECS])
def test_every_family_has_a_feasible_space_over_its_own_knobs(spec: Spec, kind: str) -> None:
    space = build_space(spec, H100, kind=kind)
    assert space.kind == kind and space.tunable
    default = config_to_dict(default_config(spec, kind))
    for name in PARAMS:
        if name not in FAMILIES[kind].choices:
            assert space.choices[name] == (default[name],)  # a knob the family does not read stays put
    for config in space.configs:
        assert infeasible_reasons(spec, config, H100, kind=kind) == []
        assert plan_for(spec, config, kind).kernel_family == kind


@pytest.mark.parametrize("rows", [1, 3, 16, 100])
def test_rope_rows_per_program_never_exceed_the_rows(rows: int) -> None:
    spec = RopeSpec("interleaved", 64, 64, (1, 1, rows, 64), "float16")
    blocks = {c.block_m for c in build_space(spec, H100, kind="rope").configs}
    assert blocks and max(blocks) < 2 * rows and all(b & (b - 1) == 0 for b in blocks)


@pytest.mark.parametrize("gpu", [H100, L4], ids=["h100", "l4"])
def test_norm_backward_programs_follow_the_sm_count(gpu: GPUSpec) -> None:
    splits = {c.num_splits for c in build_space(NORM, gpu, kind="norm_backward").configs}
    expected = {max(1, round(gpu.sm_count * m)) for m in NORM_BACKWARD_SM_MULTIPLES}
    assert splits == {min(s, 256) for s in expected}  # 2 x 128 rows: at most one program per row
    small = NormSpec("layernorm", 64, (4, 64), "float32", 1e-5, has_bias=True)
    assert {c.num_splits for c in build_space(small, gpu, kind="norm_backward").configs} == {4}


@pytest.mark.parametrize("kind", ["norm", "norm_backward"])
def test_norm_row_blocks_are_whole_rows_up_to_the_threshold_and_chunks_beyond(kind: str) -> None:
    """Row blocks searched: NORM_CHUNKS narrower than the row, plus the whole row up to MAX_ROW_BLOCK (8192); the
    launcher default is among them."""
    for width, blocks in ((64, {64}), (4096, {1024, 2048, 4096}), (5000, {1024, 2048, 4096, 8192}),
                          (16384, {1024, 2048, 4096, 8192})):  # fmt: skip
        spec = NormSpec("rmsnorm", width, (256, width), "bfloat16", 1e-6)
        space = build_space(spec, H100, kind=kind)
        assert {c.block_n for c in space.configs} == blocks
        assert default_config(spec, kind).block_n == (4096 if width > 8192 else max(blocks))
        chunked = {c.block_n for c in space.configs if plan_for(spec, c, kind).norm_chunked}
        assert chunked == {b for b in blocks if b < 1 << (width - 1).bit_length()}


def test_decode_tunes_its_split_count_and_never_its_rows() -> None:
    space = build_space(DECODE, H100)
    assert space.kind == "attention_decode" and len({c.block_m for c in space.configs}) == 1
    splits = {c.num_splits for c in space.configs}
    assert None in splits and {4, 8, 16, 32} <= splits  # the heuristic and explicit counts
    for config in space.configs:
        layout = plan_for(DECODE, config, "attention_decode").decode_layout()
        assert config.num_splits is None or config.num_splits <= layout.work_splits
    short = dataclasses.replace(DECODE, kv_len=512)  # 512 keys hold at most 32 blocks of 16: 64 splits do no work
    assert max(c.num_splits or 0 for c in build_space(short, H100).configs) <= 32


def test_a_family_the_spec_does_not_launch_is_refused() -> None:
    with pytest.raises(ValueError, match="kernel family"):
        build_space(NORM, H100, kind="bogus")


def test_config_dict_round_trip_and_validation() -> None:
    config = TileConfig(128, 32, 8, 3)
    assert config_to_dict(config)["num_splits"] == HEURISTIC_SPLITS
    assert config_from_dict(config_to_dict(config)) == config
    split = TileConfig(64, 64, 4, 2, num_splits=16)
    assert config_to_dict(split)["num_splits"] == 16 and config_from_dict(config_to_dict(split)) == split
    old = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}  # written before num_splits existed
    assert config_from_dict(old) == TileConfig(64, 64, 4, 2, None)
    with pytest.raises(ValueError, match="keys"):
        config_from_dict({"block_m": 64})
    with pytest.raises(ValueError, match="num_warps"):
        config_from_dict({"block_m": 64, "block_n": 64, "num_warps": "4", "num_stages": 2})
    with pytest.raises(ValueError, match="num_splits"):
        config_from_dict({**old, "num_splits": -1})
