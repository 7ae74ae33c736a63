"""Models from other libraries (the `zoo` extra), compiled with tilefuse: every site fused, numerics of eager.

A small subset of benchmarks/ecosystem.py's survey, one model per spelling family, so the suite stays within its
time budget: diffusers' Wan (interleaved RoPE written into `empty_like` through strided slices, RMS QK-norm across
heads, self and cross attention) and DiT with the classic processor (scores by `baddbmm(beta=0)`), torchtune's
Llama 3 (its RoPE module, SDPA's output viewed after a transpose; a training step) and x-transformers with MQA
through einsum, L2 QK-norm, `F.normalize` RMSNorm and einops rotate-half RoPE. Each fails on the code before issue
16. The allow-list of true decline reasons and the tolerances are the survey's (`TRUE_DECLINES`, `problems`),
defined once there; the site counts it finds in each model (`expected_sites`) are pinned here, so a library
renaming a class that the count keys on fails the test instead of making every check vacuous.
"""

from __future__ import annotations

import pytest

from tilefuse.benchmarks import ecosystem

pytestmark = pytest.mark.zoo

# (case, the library it needs, the sites of each kind the model holds: attention, rmsnorm, layernorm, rope)
MODELS = [
    ("diffusers:Wan", "diffusers", (2, 4, 4, 2)),  # self and cross attention; RoPE on self-attention's q and k
    ("diffusers:DiT-classic-processor", "diffusers", (1, 0, 3, 0)),
    ("torchtune:llama3", "torchtune", (1, 3, 0, 2)),
    ("x-transformers:decoder-mqa-qk-norm-rmsnorm", "x_transformers", (1, 5, 0, 2)),  # 3 RMSNorm + L2 on q and k
]


@pytest.mark.parametrize(("name", "library", "counts"), MODELS, ids=[name for name, *_ in MODELS])
def test_every_site_fused_and_equal_to_eager(name: str, library: str, counts: tuple[int, ...]) -> None:
    pytest.importorskip(library)
    row = ecosystem.measure(ecosystem.CASES[name])
    # the survey's count of the model's sites, against which the problems below are found, is the one expected
    assert row["expected"] == dict(zip(ecosystem.KINDS, counts, strict=True))
    assert "inference" in row and ("training" in row) == ecosystem.CASES[name].train
    for mode in ("inference", "training"):
        if mode in row:
            assert not row[mode]["problems"], (mode, row[mode]["problems"])
