"""More hand-written softmax spellings (canonicalize_softmax.py): a row sum without keepdim put back as a size-1
dim, casts that upcast the exp or the sum, the shift written as an add of a negation, and the functional
softmax with a dtype. Each family fuses with eager's numerics and dtype; look-alikes that are not a softmax over
the reduced dim (or would lose precision) stay as written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from _helpers import PIPELINE, assert_fused, assert_no_worse_than_eager, fuse, ops_in, run_pass
from test_manual_softmax import (
    ManualAttention,
    Probs,
    assert_matches_golden,
    assert_rewritten_and_fused,
    by_name,
    check_not_fused,
    qkv,
)
from torch import Tensor

from tilefuse.compiler.capture import dynamo_graph_to_aten
from tilefuse.passes.base import PassContext
from tilefuse.passes.canonicalize import CanonicalizePass
from tilefuse.passes.manager import check_graph

FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


# ------------------------------------------------------------------------- row sum put back as a size-1 dim
def sum_indexed_none(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.sum(-1)[..., None]


def sum_unsqueezed(s: Tensor) -> Tensor:
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1).unsqueeze(-1)


def sum_viewed(s: Tensor) -> Tensor:
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=False).view(*e.shape[:-1], 1)


def sum_reshaped_reciprocal(s: Tensor) -> Tensor:
    e = s.exp()
    return e * e.sum(3).reshape(*e.shape[:-1], 1).reciprocal()


# ------------------------------------------------------------------------------ casts that lose nothing
# Each returns the chain's own dtype: fp32 for bf16 scores. Attention casts back (`cast_back`) to meet bf16 V.
def sum_upcast(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.float().sum(-1, keepdim=True)


def sum_with_dtype(s: Tensor) -> Tensor:
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True, dtype=torch.float32)


def exp_upcast(s: Tensor) -> Tensor:
    e = s.exp().float()
    return e / e.sum(-1, keepdim=True)


def sum_upcast_unsqueezed(s: Tensor) -> Tensor:
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.float().sum(-1)[..., None]


UPCASTS = by_name(sum_upcast, sum_with_dtype, exp_upcast, sum_upcast_unsqueezed)


def cast_back(probs: Probs) -> Probs:
    return lambda s: probs(s).to(s.dtype)


# ------------------------------------------------------------------------------ shift as add of a negation
def add_negated_max(s: Tensor) -> Tensor:
    e = torch.exp(s + (-s.amax(-1, keepdim=True)))
    return e / e.sum(-1, keepdim=True)


def add_neg_method(s: Tensor) -> Tensor:
    e = torch.exp(s + s.amax(-1, keepdim=True).neg())
    return e / e.sum(-1, keepdim=True)


def negated_max_plus_scores(s: Tensor) -> Tensor:
    e = torch.exp(-s.max(-1, keepdim=True).values + s)
    return e / e.sum(-1, keepdim=True)


def torch_sub(s: Tensor) -> Tensor:  # the same aten.sub as `-`; kept as a spelling
    e = torch.sub(s, s.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def add_negated_logsumexp(s: Tensor) -> Tensor:
    return torch.exp(s + (-torch.logsumexp(s, -1, keepdim=True)))


SPELLINGS = by_name(
    sum_indexed_none,
    sum_unsqueezed,
    sum_viewed,
    sum_reshaped_reciprocal,
    add_negated_max,
    add_neg_method,
    negated_max_plus_scores,
    torch_sub,
    add_negated_logsumexp,
) | {name: cast_back(fn) for name, fn in UPCASTS.items()}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_fuses_with_eager_numerics(name: str, dtype: torch.dtype) -> None:
    module, inputs = ManualAttention(SPELLINGS[name]), qkv(dtype=dtype)
    gm, ctx = fuse(module, inputs)
    spec = assert_rewritten_and_fused(gm, ctx)
    assert spec.dtype == str(dtype).removeprefix("torch.") and spec.scale == pytest.approx(inputs[0].shape[-1] ** -0.5)
    assert_matches_golden(gm, module, inputs, floor=FLOOR[dtype])


@pytest.mark.parametrize("name", sorted(UPCASTS))
def test_upcast_chain_becomes_a_softmax_of_its_dtype_no_less_accurate(name: str) -> None:
    """The bf16 chain returns fp32; so does its softmax, computed in fp32 from the bf16 scores: no further from
    the fp64 answer than eager, which rounds the exp (and the shifted scores) to bf16 first."""
    probs, s = UPCASTS[name], torch.randn(2, 3, 17, 40, generator=torch.Generator().manual_seed(0)) * 3
    gm, ctx = run_pass(CanonicalizePass(), probs, (s.bfloat16(),))
    assert ctx.counters["canonicalize_softmax"] == 1 and not ops_in(gm) & {"aten.exp", "aten.sum"}, gm.code
    ours, eager = gm(s.bfloat16()), probs(s.bfloat16())
    assert ours.dtype == eager.dtype == torch.float32
    assert_no_worse_than_eager(ours, eager, probs(s.bfloat16().double()), floor=0.0)


def functional_with_dtype(s: Tensor) -> Tensor:
    return F.softmax(s, dim=-1, dtype=torch.float32).to(s.dtype)  # traces to one softmax(s, -1, float32)


def functional_of_shifted(s: Tensor) -> Tensor:
    return F.softmax(s + s.amax(-1, keepdim=True).neg(), dim=-1)  # the matcher drops the shift itself


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("probs", [functional_with_dtype, functional_of_shifted], ids=lambda f: f.__name__)
def test_functional_softmax_fuses_as_it_is(probs: Probs, dtype: torch.dtype) -> None:
    module, inputs = ManualAttention(probs), qkv(dtype=dtype)
    gm, ctx = fuse(module, inputs)
    assert not ctx.counters["canonicalize_softmax"]
    (spec,) = assert_fused(gm, ctx)
    assert spec.dtype == str(dtype).removeprefix("torch.") and spec.mask == "none"
    assert_matches_golden(gm, module, inputs, floor=FLOOR[dtype])


def test_added_negated_tensor_stays_as_a_bias() -> None:
    """s + -t, t a per-column tensor: not a row statistic, so the add stays inside the softmax, where the
    attention takes -t as an additive bias (exact: t depends on neither Q nor K)."""

    def probs(s: Tensor) -> Tensor:
        e = torch.exp(s + -torch.linspace(0.0, 3.0, s.shape[-1]))
        return e / e.sum(-1, keepdim=True)

    module, inputs = ManualAttention(probs), qkv()
    gm, ctx = fuse(module, inputs)
    spec = assert_rewritten_and_fused(gm, ctx)
    assert spec.mask != "none", spec
    assert_matches_golden(gm, module, inputs, floor=1e-6)


# ---------------------------------------------------------------------------------------- not a softmax of s
def sum_indexed_as_columns(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.sum(-1)[..., None, :]  # row j's sum divides column j


def sum_viewed_as_columns(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.sum(-1).view(*e.shape[:-2], 1, e.shape[-2])  # [B, H, 1, N]: the same element count, transposed


def column_sum_unsqueezed_last(s: Tensor) -> Tensor:
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-2).unsqueeze(-1)  # [B, H, N, 1] like a row sum, but of columns


def column_sum_indexed_none(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.sum(-2)[..., None]


def sum_narrowed(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.half().sum(-1, keepdim=True)  # eager's sum rounds to fp16: a softmax would not reproduce it


def sum_with_narrower_dtype(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.sum(-1, keepdim=True, dtype=torch.float16)


def add_negated_column_max(s: Tensor) -> Tensor:
    e = torch.exp(s + (-s.amax(-2, keepdim=True)))
    return e / e.sum(-1, keepdim=True)


def add_row_max(s: Tensor) -> Tensor:
    e = torch.exp(s + s.amax(-1, keepdim=True))  # not a negation: stays (softmax(s + m) is the same, unclaimed)
    return e / e.sum(-1, keepdim=True)


def add_negated_max_of_other_scores(s: Tensor) -> Tensor:
    e = torch.exp(s + (-(2 * s).amax(-1, keepdim=True)))
    return e / e.sum(-1, keepdim=True)


def add_negated_detached_logsumexp(s: Tensor) -> Tensor:
    return torch.exp(s + (-torch.logsumexp(s, -1, keepdim=True).detach()))  # softmax's value, not its gradient


def functional_softmax_over_queries(s: Tensor) -> Tensor:
    return F.softmax(s, dim=-2, dtype=torch.float32).to(s.dtype)


FROM_SCORES = "computed from the scores themselves"
# name: (probabilities, whether the chain becomes a softmax, the attention's decline reason or None)
NOT_SOFTMAX_OF_S: dict[str, tuple[Probs, bool, str | None]] = {
    "sum_indexed_as_columns": (sum_indexed_as_columns, False, None),
    "sum_viewed_as_columns": (sum_viewed_as_columns, False, None),
    "column_sum_unsqueezed_last": (column_sum_unsqueezed_last, False, None),
    "column_sum_indexed_none": (column_sum_indexed_none, False, None),
    "sum_narrowed": (sum_narrowed, False, None),
    "sum_with_narrower_dtype": (sum_with_narrower_dtype, False, None),
    "add_negated_column_max": (add_negated_column_max, True, FROM_SCORES),
    "add_row_max": (add_row_max, True, FROM_SCORES),
    "add_negated_max_of_other_scores": (add_negated_max_of_other_scores, True, FROM_SCORES),
    "add_negated_detached_logsumexp": (add_negated_detached_logsumexp, False, None),
    "functional_softmax_over_queries": (functional_softmax_over_queries, False, "softmax over dim -2"),
}


@pytest.mark.parametrize("name", sorted(NOT_SOFTMAX_OF_S))
def test_look_alike_that_is_not_a_softmax_of_the_scores_is_not_fused(name: str) -> None:
    check_not_fused(*NOT_SOFTMAX_OF_S[name])


def returning(link: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """Attention through an upcast, re-expanded chain that also returns one of its links (`link`): the
    hand-written form must stay for that reader."""

    def attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        e = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).exp()
        upcast = e.double()
        total = upcast.sum(-1)
        expanded = total[..., None]
        return (e / expanded).float() @ v, {"upcast": upcast, "sum": total, "expanded": expanded}[link]

    return attention


@pytest.mark.parametrize("returned", ["upcast", "sum", "expanded"])
def test_link_read_elsewhere_keeps_the_hand_written_form(returned: str) -> None:
    module, inputs = returning(returned), qkv()
    gm, ctx = fuse(module, inputs)
    assert not ctx.counters["canonicalize_softmax"] and not ctx.sites, gm.code
    for ours, eager in zip(gm(*inputs), module(*inputs), strict=True):
        torch.testing.assert_close(ours, eager, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------- symbolic shapes
def _fuse_dynamic(probs: Probs, inputs: tuple[Tensor, ...]) -> tuple[PassContext, Tensor]:
    """Compile through Dynamo with the sequence length symbolic; the pipeline's context and the output."""
    contexts: list[PassContext] = []

    def backend(gm: fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        aten_gm, ctx = dynamo_graph_to_aten(gm, example_inputs), PassContext()
        PIPELINE(aten_gm, ctx)
        check_graph(aten_gm)
        contexts.append(ctx)
        return aten_gm

    for t in inputs:
        torch._dynamo.mark_dynamic(t, 2)
    torch._dynamo.reset()
    out = torch.compile(ManualAttention(probs), backend=backend, fullgraph=True)(*inputs)
    (ctx,) = contexts
    return ctx, out


def sum_viewed_symbolic_columns(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.sum(-1).view(*e.shape[:-2], 1, e.shape[-1])  # [B, H, 1, N]: N is not provably 1


@pytest.mark.parametrize(
    ("probs", "fused"), [(sum_viewed, True), (sum_upcast_unsqueezed, True), (sum_viewed_symbolic_columns, False)]
)
def test_symbolic_sequence_length(probs: Probs, fused: bool) -> None:
    """The view's shape is compared with the keepdim shape symbolically: [B, H, s0, 1] is, [B, H, 1, s0] is not."""
    probs = cast_back(probs) if probs in UPCASTS.values() else probs
    inputs = qkv(n=19)
    ctx, out = _fuse_dynamic(probs, inputs)
    assert ctx.counters["canonicalize_softmax"] == fused and ctx.counters["attention_fused"] == fused, ctx.sites
    torch.testing.assert_close(out, ManualAttention(probs)(*inputs), atol=1e-5, rtol=1e-5)
