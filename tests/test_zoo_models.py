"""Models from other libraries (the `zoo` extra), compiled with tilefuse: every site fused, numerics of eager.

A small subset of benchmarks/ecosystem.py's survey, one model per spelling family, so the suite stays within its
time budget: diffusers' Wan (interleaved RoPE written into `empty_like` through strided slices, RMS QK-norm across
heads, self and cross attention) and DiT with the classic processor (scores by `baddbmm(beta=0)`), torchtune's
Llama 3 (its RoPE module, SDPA's output viewed after a transpose; a training step) and x-transformers with MQA
through einsum, L2 QK-norm, `F.normalize` RMSNorm and einops rotate-half RoPE. Each fails on the code before issue
16. The expected site counts, the allow-list of true decline reasons and the tolerances are the survey's
(`expected_sites`, `TRUE_DECLINES`, `problems`), defined once there.
"""

from __future__ import annotations

import pytest

from tilefuse.benchmarks import ecosystem

pytestmark = pytest.mark.zoo

# (case, the library it needs)
MODELS = [
    ("diffusers:Wan", "diffusers"),
    ("diffusers:DiT-classic-processor", "diffusers"),
    ("torchtune:llama3", "torchtune"),
    ("x-transformers:decoder-mqa-qk-norm-rmsnorm", "x_transformers"),
]


@pytest.mark.parametrize(("name", "library"), MODELS, ids=[name for name, _ in MODELS])
def test_every_site_fused_and_equal_to_eager(name: str, library: str) -> None:
    pytest.importorskip(library)
    row = ecosystem.measure(ecosystem.CASES[name])
    for mode in ("inference", "training"):
        if mode in row:
            assert not row[mode]["problems"], (mode, row[mode]["problems"])
    # the survey found sites of every kind the model holds (a count of zero would make the checks above vacuous)
    assert row["expected"]["attention"] > 0
