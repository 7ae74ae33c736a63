"""The kernel family table (`codegen.families`): every record is complete and consistent with the others, so
adding a family is one module and one table entry."""

from __future__ import annotations

import importlib

import pytest

from tilefuse.codegen.families import FAMILIES, KERNEL_FAMILIES, default_config, kernel_family, spec_families
from tilefuse.codegen.plan import TiledPlan
from tilefuse.codegen.tile_config import PARAMS, TileConfig, config_from_dict, config_to_dict
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

PREFILL = AttentionSpec(2, 8, 2, 256, 256, 64, 64, "bfloat16", 0.125, True, gqa_group=4)
DECODE = AttentionSpec(4, 32, 8, 1, 4096, 128, 128, "bfloat16", 128**-0.5, True, "bottom_right", gqa_group=4)
NORM = NormSpec("rmsnorm", 4096, (4, 128, 4096), "bfloat16", 1e-6)
ROPE = RopeSpec("rotate_half", 128, 128, (1, 32, 128, 128), "bfloat16")
SPECS: dict[str, Spec] = {"attention": PREFILL, "attention_decode": DECODE, "attention_backward": PREFILL,
                          "norm": NORM, "norm_backward": NORM, "rope": ROPE}  # fmt: skip
TARGET = {"smem_bytes": 228 * 1024, "max_head_dim": 256}


def test_the_table_keeps_the_stored_names_in_order() -> None:
    """Tuning databases and the learned model's one-hot columns store these names: they must not change."""
    assert KERNEL_FAMILIES == (
        "attention", "attention_decode", "attention_backward", "norm", "norm_backward", "rope",
    )  # fmt: skip
    assert all(record.name == name for name, record in FAMILIES.items())


@pytest.mark.parametrize("name", KERNEL_FAMILIES)
def test_every_record_is_complete(name: str) -> None:
    record, spec = FAMILIES[name], SPECS[name]
    assert name in spec_families(spec) and set(record.choices) <= set(PARAMS)
    module, kernel = record.kernel_source
    assert hasattr(importlib.import_module(module), kernel)
    config = default_config(spec, name)
    assert config_from_dict(config_to_dict(config)) == config
    plan = TiledPlan(spec, config, name)
    assert plan.kernel_family == name and plan.feasible(TARGET)
    assert plan.hbm_read_bytes > 0 and plan.hbm_write_bytes > 0 and plan.flops > 0 and plan.sram_bytes > 0
    assert plan.variants() and record.launch_key(spec) is not None
    assert record.duplicate_reasons(spec, config) == []  # the launcher's own default is never a clamped duplicate


def test_the_dispatcher_picks_the_last_family_that_dispatches() -> None:
    assert kernel_family(PREFILL) == "attention" and kernel_family(DECODE) == "attention_decode"
    assert kernel_family(DECODE, backward=True) == "attention_backward"
    assert TiledPlan(DECODE).kernel_family == "attention_decode"
    with pytest.raises(ValueError, match="backward"):
        kernel_family(ROPE, backward=True)


def test_a_record_refuses_a_spec_of_another_kind() -> None:
    with pytest.raises(TypeError, match="NormSpec"):
        _ = TiledPlan(ROPE, TileConfig(), "norm").grid
    with pytest.raises(ValueError, match="kernel family"):
        _ = TiledPlan(ROPE, TileConfig(), "attention_fwd").grid  # the plan's old name of the FA2 forward is gone


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 200), (2, 4, 100, 200), (1, 4, 100, 200)])
def test_block_list_strides_are_the_launchers(causal: bool, mask_shape: tuple[int, ...]) -> None:
    """The mask block-list strides a record's variants carry are those of the lists the launchers build."""
    import torch

    from tilefuse.codegen.attention_args import mask_block_list, mask_kept_blocks
    from tilefuse.codegen.families.attention import block_list_ints
    from tilefuse.codegen.families.decode import DecodeFamily
    from tilefuse.codegen.op_schema import AttnFlags

    spec = AttentionSpec(2, 4, 2, 100, 200, 64, 64, "bfloat16", 0.125, causal, mask="boolean", mask_shape=mask_shape,
                         gqa_group=2)  # fmt: skip
    mask, flags = torch.ones(mask_shape, dtype=torch.bool), AttnFlags.from_spec(spec)
    for block_m, block_n, by_key in ((32, 64, False), (64, 32, True), (128, 128, False)):
        tiles = mask_block_list(mask, 100, 200, block_m, block_n, flags, by_key)
        expected = dict(zip(["ib", "ih", "im", "nb", "nh", "nm"], tiles.strides(), strict=True))
        assert block_list_ints(spec, block_m, block_n, by_key) == {f"stride_{k}": v for k, v in expected.items()}
    kept = mask_kept_blocks(mask, 100, 200, 32, 2)
    strides = dict(zip(["ib", "ih", "pb", "ph"], kept.strides(), strict=True))
    assert DecodeFamily.kept_blocks_ints(spec, 32) == {f"stride_{k}": v for k, v in strides.items()}


def test_rope_launch_ints_are_the_launchers() -> None:
    """RoPE's variant carries the launcher's ints: rows and x's leading dims, and an [N, rotary_dim] table's
    strides broadcast to them (`rope_kernels._launch`)."""
    import torch

    from tilefuse.codegen.families.rope import RopeFamily

    spec = RopeSpec("rotate_half", 96, 128, (2, 8, 64, 128), "bfloat16")
    table = torch.empty(64, 96).expand(2, 8, 64, 96).stride()
    expected = {"rows": 2 * 8 * 64, "dim1": 8, "dim2": 64, "head_dim": 128, "half": 48}
    expected |= {f"{t}_s{i}": stride for t in ("cos", "sin") for i, stride in enumerate(table)}
    assert RopeFamily.launch_ints(spec) == expected
