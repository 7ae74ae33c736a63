"""The compiled kernel of every plan family (`TiledPlan.variants`, from its record): the variant each family
launches, with launch-like ints, and one sm_90 compile per family in a single child process (TRITON_INTERPRET=1
replaces kernels in this one); the attention backward's features combine its dK/dV and dQ kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tilefuse.codegen.families import KERNEL_FAMILIES, default_config, plan_for
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.costmodel.features import KernelFeatures, combine_features
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

PREFILL = AttentionSpec(2, 8, 8, 1024, 1024, 64, 64, "bfloat16", 0.125, True)
DECODE = AttentionSpec(4, 32, 8, 1, 4096, 128, 128, "bfloat16", 128**-0.5, True, "bottom_right", gqa_group=4)
NORM = NormSpec("rmsnorm", 4096, (4096, 4096), "bfloat16", 1e-6, out_dtype="bfloat16")
ROPE = RopeSpec("rotate_half", 128, 128, (1, 32, 4096, 128), "bfloat16")
CASES: dict[str, Spec] = {"attention": PREFILL, "attention_decode": DECODE, "attention_backward": PREFILL,
                          "norm": NORM, "norm_backward": NORM, "rope": ROPE}  # fmt: skip
KERNELS = {
    "attention": ("attention_fwd_kernel",), "attention_decode": ("attention_decode_split_kernel",),
    "attention_backward": ("attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"),
    "norm": ("norm_forward_kernel",), "norm_backward": ("norm_backward_kernel",), "rope": ("rope_kernel",),
}  # fmt: skip


@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_each_family_has_its_kernel(family: str) -> None:
    plan = plan_for(CASES[family], default_config(CASES[family], family), family)
    variants = plan.variants()
    assert tuple(v.kernel().fn.__name__ for v in variants) == KERNELS[family]
    assert all(v.ints and v.num_warps == plan.config.num_warps for v in variants)


def test_launch_like_ints() -> None:
    (decode,) = plan_for(DECODE, TileConfig(block_n=64, num_warps=4, num_splits=16), "attention_decode").variants()
    assert decode.ints is not None
    assert (decode.ints["num_splits"], decode.ints["split_len"], decode.ints["kv_heads"]) == (16, 256, 8)
    assert decode.ints["stride_kd"] == 1 and decode.ints["pos_offset"] == 4095
    dkdv, dq = plan_for(PREFILL, TileConfig(32, 64, 8, 2), "attention_backward").variants()
    assert dkdv.ints is not None and dkdv.ints["stride_dkn"] == 64 and dkdv.ints["stride_gm"] == 64
    assert dkdv.constexprs["BLOCK_M"] == dq.constexprs["BLOCK_M"] == 32 and dq.num_stages == 2
    (norm_bwd,) = plan_for(NORM, TileConfig(num_warps=8, num_splits=128), "norm_backward").variants()
    assert norm_bwd.ints == {"rows": 4096, "width": 4096, "rows_per_program": 32}


def test_combined_features_take_the_worst_kernel() -> None:
    def part(name: str, registers: int, spill: int, dots: int) -> KernelFeatures:
        return KernelFeatures(name, "sm_90", "ok", 8, 2, None, registers, spill, 1000 * registers, 10 * dots,
                              {"dots": dots}, {"tt.dot": dots})  # fmt: skip

    both = combine_features([part("dkdv", 200, 0, 4), part("dq", 150, 8, 3)])
    assert (both.kernel, both.registers, both.spill_bytes, both.shared_bytes) == ("dkdv+dq", 200, 8, 200_000)
    assert both.counts == {"dots": 7} and both.dot_flops == 70 and both.ok
    failed = KernelFeatures("dq", "sm_90", "infeasible", 8, 2, "out of shared memory")
    assert combine_features([part("dkdv", 200, 0, 4), failed]).reason == "out of shared memory"


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from tilefuse.codegen.families import default_config, plan_for
    from tilefuse.costmodel.cache import FeatureCache
    from tilefuse.costmodel.features import plan_features
    from tilefuse.specs import spec_from_dict
    cases, cache = json.loads(sys.argv[1]), FeatureCache(sys.argv[2])
    out = {}
    for family, spec in cases.items():
        spec = spec_from_dict(spec)
        out[family] = plan_features(plan_for(spec, default_config(spec, family), family), "sm_90", cache).to_dict()
    print(json.dumps(out))
    """
)


def test_every_family_compiles_for_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    cases = json.dumps({family: spec.to_dict() for family, spec in CASES.items()})
    done = subprocess.run([sys.executable, "-c", _SCRIPT, cases, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    if done.returncode != 0 and ("ptxas" in done.stderr or "libdevice" in done.stderr):
        pytest.skip(f"the CUDA toolchain shipped with triton is unusable here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    report = {family: KernelFeatures.from_dict(data) for family, data in result.items()}
    for family, features in report.items():
        assert features.ok and 0 < (features.registers or 0) <= 255 and features.spill_bytes == 0, (family, features)
    assert report["attention_backward"].kernel.count("+") == 1  # dK/dV and dQ compiled and combined
    assert report["attention_backward"].counts["dots"] > report["attention"].counts["dots"]
    assert report["attention_decode"].kernel.startswith("attention_decode")
    assert report["norm_backward"].counts["loops"] == 1 and report["norm"].counts["dots"] == 0
