"""Masks the graph writes in place, and additive masks whose fill does not absorb the scores, keep eager's meaning.

A mask (or an input it is built from) written after it is made is no longer what its ops say: it must not be
proven causal or ALiBi from them, nor from a module buffer's value at call entry; the fused op reads it as a tensor.
An additive {0, fill} mask becomes a hard keep-mask only for a fill that absorbs the scores (-inf, finfo.min): with
-1e4 a fully masked row is a softmax of its scores in eager, so the mask stays additive.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tilefuse.compiler.backend import TilefuseBackend
from tilefuse.compiler.options import Options
from tilefuse.specs import AttentionSpec

N, D = 8, 16
NEG_INF = float("-inf")


def _scores(q: Tensor, k: Tensor) -> Tensor:
    return q @ k.transpose(-1, -2) * D**-0.5


def additive_written_through_view(q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """A causal additive mask built from positions, then one masked entry opened through a flat view."""
    i = torch.arange(N)
    m = torch.where(i[None, :] > i[:, None], NEG_INF, 0.0)
    m.view(-1)[N - 1] = 0.0 * x.sum()
    return (_scores(q, k) + m).softmax(-1) @ v


def positions_written(q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """`i[k] <= i[q]` over positions one of which was overwritten: not causal."""
    i = torch.arange(N)
    i[3] = 0
    keep = i[None, :] <= i[:, None]
    return _scores(q, k).masked_fill(~keep, NEG_INF).softmax(-1) @ v


def written_term_of_a_sum(q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """The written causal mask is one term of the bias the scores add."""
    i = torch.arange(N)
    m = torch.where(i[None, :] > i[:, None], NEG_INF, 0.0)
    m[0, N - 1] = 0.0 * x.sum()
    return (_scores(q, k) + (m + 0.1 * x.sum())).softmax(-1) @ v


def alibi_written(q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """slope · key index, with the first key's bias overwritten: no ALiBi."""
    slopes = torch.tensor([0.5, 0.25])[:, None, None]
    bias = slopes * torch.arange(N)[None, None, :]
    bias[:, :, 0] = 3.0 * x.sum()
    return (_scores(q, k) + bias).softmax(-1) @ v


def padding_written_after_use(q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """The padding mask is written after the causal & padding mask read it: the op must not read it again."""
    i, pad = torch.arange(N), x[:, :N] > -10.0  # all True
    keep = (i[None, :] <= i[:, None]) & pad[:, None, None, :]
    pad[0, 0] = False
    return _scores(q, k).masked_fill(~keep, NEG_INF).softmax(-1) @ v


class WrittenBuffer(nn.Module):
    """GPT-2 style registered `tril` buffer that the forward writes before reading it."""

    mask: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(N, N, dtype=torch.bool)))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> Tensor:
        self.mask[0, N - 1] = True
        return _scores(q, k).masked_fill(~self.mask, NEG_INF).softmax(-1) @ v


def _inputs(batch: int = 1) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, 2, N, D, generator=gen) for _ in range(3))
    return q, k, v, torch.ones(1, N)


def _compiled(model: Callable[..., Tensor], *inputs: Tensor) -> tuple[Tensor, TilefuseBackend]:
    torch._dynamo.reset()
    backend = TilefuseBackend(Options(inner="eager"))
    return torch.compile(model, backend=backend)(*inputs), backend


WRITTEN: dict[str, Callable[[], Callable[..., Tensor]]] = {
    "additive_written_through_view": lambda: additive_written_through_view,
    "positions_written": lambda: positions_written,
    "written_term_of_a_sum": lambda: written_term_of_a_sum,
    "alibi_written": lambda: alibi_written,
    "padding_written_after_use": lambda: padding_written_after_use,
    "written_buffer": WrittenBuffer,
}


@pytest.mark.parametrize("name", sorted(WRITTEN))
def test_a_mask_written_in_place_is_read_as_a_tensor(name: str) -> None:
    inputs = _inputs()
    want = WRITTEN[name]()(*(t.clone() for t in inputs))
    got, backend = _compiled(WRITTEN[name](), *inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (site,) = backend.report.by_kind("attention")
    if site.status == "fused":  # else declined, with its reason
        assert isinstance(site.spec, AttentionSpec)
        assert not site.spec.causal and not site.spec.alibi and site.spec.mask != "none", site.spec
    else:
        assert site.reason


def _padded(fill: float) -> Callable[..., Tensor]:
    def attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
        bias = (1 - keep.to(q.dtype)) * fill  # diffusers, older BERT: (1 - keep) * -10000
        return (_scores(q, k) + bias[:, None, None, :]).softmax(-1) @ v

    return attend


@pytest.mark.parametrize(
    ("fill", "mask"),
    [(-1e4, "additive"), (-1e9, "additive"), (torch.finfo(torch.float32).min, "key_padding")],
)
def test_a_finite_fill_stays_additive_unless_it_absorbs_the_scores(fill: float, mask: str) -> None:
    """Batch 1 pads every key. Eager adds -1e4 to each score of that row, a softmax of the scores all the same:
    read as a hard keep-mask its row would be 0. finfo.min absorbs the scores (eager's row does not depend on
    them), the hard keep-mask it always was; those rows give 0, the op's convention for nothing to attend."""
    q, k, v, _ = _inputs(batch=2)
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[0, N - 2 :] = False
    keep[1] = False
    got, backend = _compiled(_padded(fill), q, k, v, keep)
    want = _padded(fill)(q, k, v, keep)
    (site,) = backend.report.by_kind("attention")
    assert site.status == "fused" and isinstance(site.spec, AttentionSpec) and site.spec.mask == mask
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    if mask == "additive":
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    else:
        assert not got[1].any()
