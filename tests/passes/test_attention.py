"""AttentionPass: every attention spelling becomes one tilefuse::attention call with the right spec and the
module's numerics; sites that cannot be fused are declined with a reason and leave the graph as it was."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from _attention_cases import (
    CASES,
    CROSS,
    NEG_INF,
    SQUARE,
    Attend,
    B,
    Case,
    Shape,
    _scores,
    bool_mask,
    default_expect,
    padding_mask,
    qkv,
    repeat_kv,
)
from _helpers import (
    PIPELINE,
    as_double,
    assert_fused,
    assert_no_worse_than_eager,
    fuse,
    ops_in,
    reasons,
    run_pass,
    sites,
    tilefuse_nodes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tilefuse.passes.attention import AttentionPass
from tilefuse.passes.base import PassContext
from tilefuse.passes.canonicalize import CanonicalizePass
from tilefuse.passes.canonicalize_einsum import read_contraction
from tilefuse.specs import AttentionSpec, spec_from_dict


def only_site(ctx: PassContext, status: str) -> Any:
    assert [s.status for s in ctx.sites if s.kind == "attention"] == [status], ctx.sites
    return sites(ctx, "attention", status)[0]


def assert_rows_match(ours: Tensor, eager: Tensor, kept_rows: Tensor, atol: float = 1e-5) -> None:
    """Rows with a kept key match eager; fully masked rows are exactly 0 in ours (eager may give NaN or a mean)."""
    kept = kept_rows.expand(ours.shape[:-1])
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[kept], eager[kept], atol=atol, rtol=1e-5)
    assert (ours[~kept] == 0).all()


def expected_spec(case: Case, shape: Shape) -> dict[str, Any]:
    expect = {**default_expect(case, shape), **case.expect}
    if expect["mask"] == "boolean" and shape.nq == 1:
        expect["mask"] = "key_padding"  # a [B, 1, 1, Nk] keep-mask is a key-padding mask
    return expect


def check_spec(spec: AttentionSpec, expect: dict[str, Any]) -> None:
    actual = spec.to_dict()
    assert actual["scale"] == pytest.approx(expect.pop("scale"), rel=1e-6)
    assert {k: actual[k] for k in expect} == expect


# ------------------------------------------------------------------------------------------------ spellings
CASE_PARAMS = [pytest.param(name, shape, id=f"{name}-{shape}") for name, case in CASES.items() for shape in case.shapes]


@pytest.mark.parametrize(("name", "shape"), CASE_PARAMS)
def test_spelling_fuses_with_its_spec_and_numerics(name: str, shape: Shape) -> None:
    case = CASES[name]
    module, inputs = case.build(shape)
    gm, ctx = fuse(module, inputs)
    (spec,) = assert_fused(gm, ctx)
    check_spec(spec, expected_spec(case, shape))
    eager, ours = module(*inputs), gm(*inputs)
    assert ours.dtype == eager.dtype and ours.shape == eager.shape
    if shape.dtype == torch.float32:
        torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
    else:
        golden = as_double(module)(*(x.double() if x.is_floating_point() else x for x in inputs))
        assert_no_worse_than_eager(ours, eager, golden, floor=1e-3)


def test_site_records_are_json_and_specs_round_trip() -> None:
    module, inputs = CASES["causal_and_padding"].build(SQUARE[2])
    _, ctx = fuse(module, inputs)
    site = only_site(ctx, "fused")
    record = json.loads(json.dumps(site.to_dict()))
    assert record["status"] == "fused" and record["kind"] == "attention"
    assert spec_from_dict(record["spec"]) == site.spec
    assert record["spec"]["mask_shape"] == [B, 1, 1, SQUARE[2].nk]


def test_two_layers_fuse_separately() -> None:
    def two_layers(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        first = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return _scores(first, k).softmax(-1) @ v

    inputs = qkv(SQUARE[2], torch.Generator().manual_seed(0))
    gm, ctx = fuse(Attend(two_layers), inputs)
    specs = assert_fused(gm, ctx, count=2)
    assert sorted(s.causal for s in specs) == [False, True]
    torch.testing.assert_close(gm(*inputs), two_layers(*inputs), atol=1e-5, rtol=1e-5)


def test_eval_dropout_left_in_the_graph_is_fused_as_inactive() -> None:
    """Without CanonicalizePass the eval-mode dropout reaches the matcher: it is skipped, and p is not recorded."""
    module, inputs = CASES["dropout_eval_functional"].build(SQUARE[2])
    gm, ctx = run_pass(AttentionPass(), module, inputs)
    (spec,) = assert_fused(gm, ctx)
    assert spec.dropout_p == 0.0 and "aten.dropout" not in ops_in(gm)
    torch.testing.assert_close(gm(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)


def test_disabled_attention_is_not_touched() -> None:
    module, inputs = CASES["sdpa_causal"].build(SQUARE[2])
    gm, ctx = run_pass(PIPELINE, module, inputs, PassContext(enabled=frozenset({"rmsnorm"})))
    assert not ctx.sites and "aten.scaled_dot_product_attention" in ops_in(gm)


# ------------------------------------------------------------------------------------- fully masked rows
def _padded_out(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    return (_scores(q, k).masked_fill(~keep, NEG_INF)).softmax(-1) @ v


def _finfo_filled(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    s = _scores(q, k)
    return torch.where(keep, s, torch.finfo(s.dtype).min).softmax(-1) @ v


@pytest.mark.parametrize("fn", [_padded_out, _finfo_filled, F.scaled_dot_product_attention])
def test_fully_masked_rows_give_zeros(fn: Callable[..., Tensor]) -> None:
    shape = SQUARE[2]
    q, k, v = qkv(shape, torch.Generator().manual_seed(0))
    keep = bool_mask(shape, torch.Generator().manual_seed(1))[0].clone()
    keep[1, :, 3:6] = False  # three rows of batch 1 see no key
    gm, ctx = fuse(Attend(fn), (q, k, v, keep))
    assert_fused(gm, ctx)
    assert_rows_match(gm(q, k, v, keep), fn(q, k, v, keep), keep.any(-1))


def test_fully_padded_sequence_gives_zeros() -> None:
    shape = SQUARE[2]
    q, k, v = qkv(shape, torch.Generator().manual_seed(0))
    (pad,) = padding_mask(shape, torch.Generator())
    pad = pad.clone()
    pad[1] = False
    gm, ctx = fuse(Attend(_padded_out), (q, k, v, pad))
    assert only_site(ctx, "fused").spec.mask == "key_padding"
    assert_rows_match(gm(q, k, v, pad), _padded_out(q, k, v, pad), pad.any(-1))


def test_bottom_right_causal_with_more_queries_than_keys() -> None:
    shape = Shape(17, 5, 16)
    inputs = qkv(shape, torch.Generator().manual_seed(0))
    module = Attend(CASES["causal_bottom_right"].fn)
    gm, ctx = fuse(module, inputs)
    (spec,) = assert_fused(gm, ctx)
    assert (spec.causal, spec.align) == (True, "bottom_right")
    kept_rows = torch.arange(shape.nq) + shape.nk - shape.nq >= 0
    assert_rows_match(gm(*inputs), module(*inputs), kept_rows)


# ------------------------------------------------------------------------------------------------- declines
def returns_probs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    p = _scores(q, k).softmax(-1)
    return p @ v, p


def scores_reused(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    s = _scores(q, k)
    p = s.masked_fill(mask == 0, NEG_INF).softmax(-1)
    return p @ v, s.sum()


def tensor_scale(q: Tensor, k: Tensor, v: Tensor, scale: Tensor) -> Tensor:
    return (q @ k.transpose(-2, -1) * scale).softmax(-1) @ v


def softmax_over_queries(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _scores(q, k).softmax(-2) @ v


def sdpa_math_dropout_mask(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    keep = torch.ones(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=q.dtype)
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, dropout_p=0.1, dropout_mask=keep)[0]


def masked_fill_zero(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return _scores(q, k).masked_fill(mask == 0, 0.0).softmax(-1) @ v


def scaled_after_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return ((q @ k.transpose(-2, -1)).masked_fill(mask == 0, NEG_INF) * 0.25).softmax(-1) @ v


def mqa_einsum_scores_reused(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Read as matmuls for the match (one K/V head, no heads axis), then declined: the einsums are put back."""
    s = torch.einsum("bhid,bjd->bhij", q, k[:, 0])
    return torch.einsum("bhij,bjd->bhid", s.softmax(-1), v[:, 0]), s.sum()


def int_extra(shape: Shape) -> tuple[Tensor, ...]:
    return (bool_mask(shape, torch.Generator().manual_seed(1))[0].long(),)


DECLINES: dict[str, tuple[Callable[..., Any], Callable[[Shape], tuple[Tensor, ...]], str]] = {
    "returns_probs": (returns_probs, lambda s: (), "are used outside the attention"),
    "scores_reused": (scores_reused, int_extra, "are used outside it"),
    "tensor_scale": (tensor_scale, lambda s: (torch.tensor(s.d**-0.5),), "tensor-valued factor"),
    "softmax_over_queries": (softmax_over_queries, lambda s: (), "softmax over dim -2"),
    "sdpa_math_dropout_mask": (sdpa_math_dropout_mask, lambda s: (), "explicit dropout mask"),
    "masked_fill_zero": (masked_fill_zero, int_extra, "is not a mask"),
    "scaled_after_mask": (scaled_after_mask, int_extra, "scaled after softcap or masking"),
    "mqa_einsum_scores_reused": (mqa_einsum_scores_reused, lambda s: (), "are used outside it"),
}


def _call_targets(gm: fx.GraphModule) -> list[Any]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", sorted(DECLINES))
def test_decline_records_a_reason_and_leaves_the_graph(name: str) -> None:
    fn, extras, reason = DECLINES[name]
    shape = SQUARE[2]
    inputs = (*qkv(shape, torch.Generator().manual_seed(0)), *extras(shape))
    gm, ctx = fuse(Attend(fn), inputs)
    canonical, _ = run_pass(CanonicalizePass(), Attend(fn), inputs)
    site = only_site(ctx, "declined")
    assert reason in site.reason, reasons(ctx)
    json.dumps(site.to_dict())
    assert not tilefuse_nodes(gm, "attention")
    assert _call_targets(gm) == _call_targets(canonical)  # nothing inserted, nothing removed
    torch.testing.assert_close(gm(*inputs), Attend(fn)(*inputs), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("equation", "ranks", "reading"),
    [
        ("b h i d, b j d -> b h i j", (4, 3), ("bh", "idj", False)),  # x-transformers, one K/V head
        ("bhij,bjd->bhid", (4, 3), ("bh", "ijd", False)),
        ("bqhd,bkhd->bhqk", (4, 4), ("bh", "qdk", False)),  # sequence-major operands
        ("bhqk,bkhd->bqhd", (4, 4), ("bh", "qkd", False)),  # ... and output
        ("bhjd,bhid->bhij", (4, 4), ("bh", "idj", True)),  # K first
        ("...id,...jd->...ij", (4, 3), ("23", "idj", False)),  # an ellipsis broadcasting over heads
        ("bid,bjd", (3, 3), None),  # implicit output: b and d are summed
        ("bhid,bhjd->bhi", (4, 4), None),  # two contracted labels
        ("bhii,bhid->bhid", (4, 4), None),  # a diagonal
        ("bhid,bhjd->bhij", (4, 3), None),  # ranks that do not fit the labels
    ],
)
def test_einsum_read_as_one_matmul(equation: str, ranks: tuple[int, int], reading: Any) -> None:
    form = read_contraction(equation, ranks)
    got = None if form is None else ("".join(form.batch), form.m + form.c + form.n, form.swapped)
    assert got == reading


# ---------------------------------------------------------------------------------- spellings still declined
def einsum_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def inplace_mask(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = q @ k.transpose(-2, -1)
    s /= math.sqrt(q.shape[-1])
    keep = torch.tril(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool))
    s.masked_fill_(~keep, NEG_INF)
    return s.softmax(-1) @ v


def where_tensor_fill(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    keep = torch.tril(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool))
    return torch.where(keep, s, torch.tensor(NEG_INF)).softmax(-1) @ v


def where_full_like_fill(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    keep = torch.tril(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool))
    return torch.where(keep, s, torch.full_like(s, NEG_INF)).softmax(-1) @ v


def tensor_constant_scale(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return (q @ k.transpose(-2, -1) / torch.tensor(math.sqrt(q.shape[-1]))).softmax(-1) @ v


def max_subtracted(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    return (s - s.amax(-1, keepdim=True)).softmax(-1) @ v


def max_values_detached(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k).masked_fill(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1), NEG_INF)
    return (s - torch.max(s, dim=-1, keepdim=True)[0].detach()).softmax(-1) @ v


def column_max_subtracted(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    return (s - s.amax(-2, keepdim=True)).softmax(-1) @ v  # not a row shift: changes the result


class BufferCausal(nn.Module):
    """GPT-2 style: a causal tril registered as a buffer and sliced per call."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None])

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        nq, nk = q.shape[-2], k.shape[-2]
        keep = self.bias[:, :, nk - nq : nk, :nk]
        return _scores(q, k).masked_fill(~keep, NEG_INF).softmax(-1) @ v


# name: (spelling, whether it is causal); CanonicalizePass turns each into a spelling the recognizer knows.
CANONICALIZED: dict[str, tuple[Callable[..., Tensor], bool]] = {
    "einsum": (einsum_attention, False),  # batched-matmul einsums become matmul
    "inplace_ops": (inplace_mask, True),  # div_/masked_fill_ on the scores become functional
    "where_tensor_constant_fill": (where_tensor_fill, True),  # where(c, s, tensor(-inf)) → where(c, s, -inf)
    "where_full_like_fill": (where_full_like_fill, True),  # where(c, s, full_like(s, -inf)) → where(c, s, -inf)
    "tensor_constant_scale": (tensor_constant_scale, False),  # a 0-d tensor literal is a scalar scale
}


@pytest.mark.parametrize("shape", [*SQUARE[2:], *CROSS], ids=str)
@pytest.mark.parametrize("name", sorted(CANONICALIZED))
def test_canonicalized_spelling_fuses(name: str, shape: Shape) -> None:
    fn, causal = CANONICALIZED[name]
    inputs = qkv(shape, torch.Generator().manual_seed(0))
    gm, ctx = fuse(Attend(fn), inputs)
    (spec,) = assert_fused(gm, ctx)
    assert spec.causal == causal and spec.scale == pytest.approx(shape.d**-0.5, rel=1e-6)
    torch.testing.assert_close(gm(*inputs), Attend(fn)(*inputs), atol=1e-5, rtol=1e-5)


def test_buffer_mask_in_a_captured_graph_stays_data() -> None:
    """A registered tril buffer is proven causal only through the backend, which guards its value at run time
    (tests/compiler/test_buffer_masks.py); a captured graph has no such guard and reads the buffer as data."""
    module = BufferCausal(17)
    inputs = qkv(SQUARE[2], torch.Generator().manual_seed(0))
    gm, ctx = fuse(module, inputs)
    torch.testing.assert_close(gm(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)
    (spec,) = assert_fused(gm, ctx)
    assert not spec.causal and spec.mask == "boolean"


# The row-max shift of a hand-written stable softmax, softmax(s - rowmax(s)), is softmax(s): the kernel's online
# softmax does the same shift itself, so the recognizer looks through it (value and gradient equal up to rounding).
@pytest.mark.parametrize(("fn", "causal"), [(max_subtracted, False), (max_values_detached, True)])
def test_row_max_shift_fuses_forward_and_backward(fn: Callable[..., Tensor], causal: bool) -> None:
    inputs = qkv(SQUARE[2], torch.Generator().manual_seed(0))
    gm, ctx = fuse(Attend(fn), inputs)
    (spec,) = assert_fused(gm, ctx)
    assert spec.causal == causal
    torch.testing.assert_close(gm(*inputs), Attend(fn)(*inputs), atol=1e-5, rtol=1e-5)
    ours = [t.detach().double().requires_grad_() for t in inputs]
    eager = [t.detach().double().requires_grad_() for t in inputs]
    gm.double()(*ours).sum().backward()
    Attend(fn)(*eager).sum().backward()
    for a, b in zip(ours, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-8)


def test_a_shift_that_is_not_the_row_max_is_declined() -> None:
    inputs = qkv(SQUARE[2], torch.Generator().manual_seed(0))
    gm, ctx = fuse(Attend(column_max_subtracted), inputs)
    assert "unsupported op" in only_site(ctx, "declined").reason
    torch.testing.assert_close(gm(*inputs), Attend(column_max_subtracted)(*inputs))


# ------------------------------------------------------------------------------------------------- property
class PositionalKeep(nn.Module):
    """keep[i, j] = (j <= pos(i)) [causal] & (pos(i) - j < window) [window] with pos(i) = i + offset."""

    def __init__(self, causal: bool, window: int | None, offset: int) -> None:
        super().__init__()
        self.causal, self.window, self.offset = causal, window, offset

    def forward(self, nq: int, nk: int) -> Tensor | None:
        q_pos = torch.arange(nq)[:, None] + self.offset
        k_idx = torch.arange(nk)[None, :]
        keep = (k_idx <= q_pos) if self.causal else None
        if self.window is not None:
            near = q_pos - k_idx < self.window
            keep = near if keep is None else keep & near
        return keep


class Generated(nn.Module):
    """GQA attention (HF repeat_kv) with an optional positional keep-mask and an optional data mask."""

    def __init__(self, group: int, positional: PositionalKeep, mask: str) -> None:
        super().__init__()
        self.group, self.positional, self.mask = group, positional, mask

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        s = q @ repeat_kv(k, self.group).transpose(-2, -1) * q.shape[-1] ** -0.5
        keep = self.positional(s.shape[-2], s.shape[-1])
        if keep is not None:
            s = s.masked_fill(~keep, NEG_INF)
        if self.mask == "additive":
            s = s + mask
        elif self.mask != "none":
            s = s.masked_fill(~mask, NEG_INF)
        return s.softmax(-1) @ repeat_kv(v, self.group)


def generated_mask(kind: str, b: int, nq: int, nk: int, gen: torch.Generator) -> Tensor:
    if kind == "additive":
        return torch.randn(b, 1, nq, nk, generator=gen)
    if kind == "key_padding":
        return torch.rand(b, 1, 1, nk, generator=gen) > 0.3
    return torch.rand(b, 1, nq, nk, generator=gen) > 0.3  # "boolean"; unused for "none"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    nq=st.integers(1, 9),
    nk=st.integers(1, 9),
    d=st.sampled_from([8, 16, 40]),
    causal=st.sampled_from(["none", "top_left", "bottom_right"]),
    window=st.sampled_from([None, 1, 3]),
    mask=st.sampled_from(["none", "additive", "boolean", "key_padding"]),
)
def test_generated_attention_fuses_and_matches(
    b: int, kv_heads: int, group: int, nq: int, nk: int, d: int, causal: str, window: int | None, mask: str
) -> None:
    gen = torch.Generator().manual_seed(nq * 100 + nk)
    q = torch.randn(b, kv_heads * group, nq, d, generator=gen)
    k, v = (torch.randn(b, kv_heads, nk, d, generator=gen) for _ in range(2))
    data = generated_mask(mask, b, nq, nk, gen)
    offset = nk - nq if causal == "bottom_right" else 0
    positional = PositionalKeep(causal != "none", window, offset)
    module = Generated(group, positional, mask)
    gm, ctx = fuse(module, (q, k, v, data))
    (spec,) = assert_fused(gm, ctx)
    check_spec(
        spec,
        {
            "scale": d**-0.5,
            "gqa_group": group,
            "causal": causal != "none",
            "window": window,
            "align": "bottom_right" if offset else "top_left",
            "mask": expected_kind(mask, nq),
        },
    )
    keep = positional(nq, nk)
    keep = torch.ones(nq, nk, dtype=torch.bool) if keep is None else keep
    if mask in ("boolean", "key_padding"):
        keep = keep & data
    assert_rows_match(gm(q, k, v, data), module(q, k, v, data), keep.any(-1))


def expected_kind(mask: str, nq: int) -> str:
    return "key_padding" if mask == "boolean" and nq == 1 else mask
