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
