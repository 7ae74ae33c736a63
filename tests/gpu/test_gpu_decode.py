"""Split-KV decode on the GPU: a few query rows over a long KV take the two-phase kernel, with the split count the
heuristic derives from the device's SM count, and match the fp64 golden within the protocol (forward only)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _kernel_watch import KernelWatch
from _numerics import check_against_golden, eager_attention
from _profile import DEVICE, PROFILE
from test_gpu_attention import BF16, FP16, Case, attention_inputs

from tilefuse import ops
from tilefuse.codegen import attention_decode as decode
from tilefuse.codegen import reference as ref

D_SMALL, D_LARGE = PROFILE.head_dims
KV_SHORT, KV_MID, KV_LONG = PROFILE.decode_kv
SPLIT, COMBINE = "attention_decode_split_kernel", "attention_decode_combine_kernel"
CASES = [
    Case("q1_gqa4", BF16, D_LARGE, 1, KV_LONG, 4, {}),
    Case("q4_gqa2_causal", FP16, D_SMALL, 4, KV_SHORT, 2, {"causal": True, "align": "bottom_right"}),
    Case("q1_gqa2_key_padding", BF16, D_LARGE, 1, KV_MID, 2, {}, "key_padding"),
]


def _sm_count() -> int:
    if DEVICE.type == "cuda":
        return int(torch.cuda.get_device_properties(DEVICE).multi_processor_count)
    return decode.NUM_SMS


def _expected_splits(case: Case, block_n: int, options: dict[str, Any]) -> int:
    flags = ref.AttnFlags(1.0, causal=bool(options.get("causal")), bottom_right=options.get("align") != "top_left")
    layout = decode.split_layout(case.nq, case.nk, block_n, flags, PROFILE.batch * PROFILE.kv_heads,
                                 num_sms=_sm_count())  # fmt: skip
    return layout.num_splits


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decode_takes_the_split_kv_kernels_and_matches_golden(case: Case, kernels: KernelWatch) -> None:
    assert decode.use_decode(case.nq, case.nk, case.group, case.head_dim)
    qkv, kwargs = attention_inputs(case, seed=case.nk)
    check_against_golden(ops.attention, eager_attention, qkv, kwargs, (["out"], "qkv"), backward=False)
    kernels.assert_ran(SPLIT, COMBINE)
    assert "attention_fwd_kernel" not in kernels.names
    (split,) = kernels.of(SPLIT)
    assert split.grid == (_expected_splits(case, split.constexprs["BLOCK_N"], kwargs), PROFILE.batch * PROFILE.kv_heads)
    assert split.grid[0] > 1, "one split: the KV was not split"
