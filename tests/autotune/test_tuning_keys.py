"""Tuning keys: shape buckets, dynamic dims, and everything else a tuned config depends on."""

from __future__ import annotations

import dataclasses

import pytest

from tilefuse.autotune.keys import TuningKey, spec_bucket, tuning_key
from tilefuse.codegen.families import KERNEL_FAMILIES, spec_families
from tilefuse.codegen.launch_configs import DYNAMIC, bucket_dim
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec


def attention(q_len: int | None = 1000, **kw: object) -> AttentionSpec:
    return AttentionSpec(3, 12, 12, q_len, q_len, 64, 64, "float16", 0.125, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("dim", "bucket"), [(0, 1), (1, 1), (2, 2), (3, 4), (17, 32), (64, 64), (1000, 1024)])
def test_dims_bucket_to_the_next_power_of_two(dim: int, bucket: int) -> None:
    assert bucket_dim(dim) == bucket


def test_dynamic_dims_are_marked() -> None:
    assert bucket_dim(None) == DYNAMIC
    assert spec_bucket(attention(None))["q_len"] == DYNAMIC
    assert tuning_key(attention(None), "sm_90") != tuning_key(attention(1024), "sm_90")


def test_specs_in_one_bucket_share_a_key() -> None:
    assert tuning_key(attention(1000), "sm_90") == tuning_key(attention(1024), "sm_90")
    rescaled = dataclasses.replace(attention(1000), scale=0.5, source="sdpa")
    assert tuning_key(rescaled, "sm_90") == tuning_key(attention(1000), "sm_90")


@pytest.mark.parametrize(
    "change",
    [{"head_dim": 128, "v_head_dim": 128}, {"causal": True}, {"mask": "boolean"}, {"dtype": "bfloat16"},
     {"q_len": 2048, "kv_len": 2048}, {"window": 256}, {"softcap": 30.0}],
)  # fmt: skip
def test_what_changes_the_kernel_changes_the_key(change: dict[str, object]) -> None:
    assert tuning_key(dataclasses.replace(attention(), **change), "sm_90") != tuning_key(attention(), "sm_90")  # type: ignore[arg-type]


def test_arch_versions_and_kernel_source_are_in_the_key() -> None:
    key = tuning_key(attention(), "sm_90")
    assert tuning_key(attention(), "sm_80") != key
    assert tuning_key(attention(), "sm_90", source_hash="0" * 64) != key
    assert set(key.to_dict()["versions"]) == {"tilefuse", "triton", "torch"}
    assert len(key.source_hash) == 64


def test_norm_keys_keep_the_width_exact() -> None:
    bucket = spec_bucket(NormSpec("rmsnorm", 4000, (2, 100, 4000), "bfloat16", 1e-6))
    assert bucket["shape"] == [2, 128, 4000]


def test_key_round_trips_through_json() -> None:
    key = tuning_key(attention(), "sm_90")
    assert TuningKey.from_dict(key.to_dict()) == key
    assert TuningKey.from_dict(key.to_dict()).digest == key.digest
    with pytest.raises(ValueError, match="arch"):
        tuning_key(attention(), "hopper")


NORM = NormSpec("rmsnorm", 4096, (2, 128, 4096), "bfloat16", 1e-6)
ROPE = RopeSpec("rotate_half", 128, 128, (2, 32, 128, 128), "bfloat16")
DECODE = AttentionSpec(4, 32, 8, 1, 4096, 128, 128, "bfloat16", 0.125, gqa_group=4)


def test_the_key_names_the_kernel_family_and_hashes_its_kernel() -> None:
    keys = {
        kind: tuning_key(spec, "sm_90", kind=kind)
        for spec in (attention(), DECODE, NORM, ROPE) for kind in spec_families(spec)
        if kind != "attention_decode" or spec is DECODE
    }  # fmt: skip
    assert set(keys) == set(KERNEL_FAMILIES) and all(k.family == kind for kind, k in keys.items())
    assert len({k.source_hash for k in keys.values()}) == len(KERNEL_FAMILIES)  # one kernel source each
    assert tuning_key(NORM, "sm_90") == keys["norm"] and tuning_key(DECODE, "sm_90") == keys["attention_decode"]
    forward, backward = tuning_key(attention(), "sm_90"), tuning_key(attention(), "sm_90", kind="attention_backward")
    assert forward.family == "attention" and forward.digest != backward.digest
    assert "norm_backward (rmsnorm)" in keys["norm_backward"].describe()
    assert backward.describe().startswith("attention_backward 4x16x16x1024x1024 d64 float16")


def test_the_attention_forward_key_hashes_the_fa2_kernel() -> None:
    """The forward's key is what it was before every family had one: the FA2 kernel's source digest."""
    from tilefuse.codegen.attention_fwd import attention_fwd_kernel
    from tilefuse.costmodel.features import kernel_source_digest

    assert tuning_key(attention(), "sm_90").source_hash == kernel_source_digest(attention_fwd_kernel)


def test_a_family_the_spec_does_not_launch_has_no_key() -> None:
    with pytest.raises(ValueError, match="kernel families"):
        tuning_key(NORM, "sm_90", kind="attention")
    with pytest.raises(ValueError, match="kernel families"):
        tuning_key(ROPE, "sm_90", kind="norm_backward")


def test_norm_sites_that_differ_only_in_what_the_backward_ignores_share_its_key() -> None:
    fused = dataclasses.replace(NORM, residual=True)
    assert tuning_key(fused, "sm_90", kind="norm_backward") == tuning_key(NORM, "sm_90", kind="norm_backward")
    assert tuning_key(fused, "sm_90", kind="norm") != tuning_key(NORM, "sm_90", kind="norm")
