"""Masks the fused op cannot take decline their site with a reason and one piece of advice, never a crash."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tilefuse.compiler.backend import TilefuseBackend
from tilefuse.compiler.options import Options
from tilefuse.passes.advice import forget_advice


class MaskedAttention(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        scores = q @ k.transpose(-1, -2) * 0.3
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return scores.softmax(-1) @ v


def _per_document_mask() -> Tensor:
    doc = torch.tensor([[0] * 3 + [1] * 5, [0] * 6 + [1] * 2, [0] * 8])
    return doc[:, None, :, None] == doc[:, None, None, :]  # [3, 1, 8, 8]: one mask per packed row


@pytest.mark.parametrize(
    ("mask", "key"),
    [
        (_per_document_mask(), "mask_widens_attention"),  # q has batch 1: eager's output takes the mask's batch
        (torch.randint(0, 3, (1, 1, 8, 8)), "integer_attention_mask"),
    ],
)
def test_a_mask_the_op_cannot_take_declines_with_advice(mask: Tensor, key: str) -> None:
    forget_advice()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    torch._dynamo.reset()
    backend = TilefuseBackend(Options(strict=True, inner="eager"))
    out = torch.compile(MaskedAttention(), backend=backend)(q, k, v, mask)
    torch.testing.assert_close(out, MaskedAttention()(q, k, v, mask))
    (site,) = backend.report.by_kind("attention")
    assert site.status == "declined"
    assert [a.key for a in backend.report.advice] == [key]
