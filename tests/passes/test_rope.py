"""RopePass: rotate-half, interleaved, complex and partial-rotary RoPE each become one tilefuse::rope op that
computes what the module computes; sites that cannot be fused are declined with a reason and left alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.fx as fx
from _helpers import (
    assert_no_worse_than_eager,
    assert_same,
    hf_inputs,
    hf_model,
    ops_in,
    reasons,
    run_pass,
    sites,
    tilefuse_nodes,
)
from torch import Tensor

from tilefuse.compiler.capture import dynamo_graph_to_aten
from tilefuse.passes import rope_match
from tilefuse.passes.base import PassContext
from tilefuse.passes.manager import PassManager, check_graph
from tilefuse.passes.rope import RopePass

Rope = Callable[[Tensor, Tensor, Tensor], Tensor]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: Tensor) -> Tensor:
    x1, x2 = x[:, :, :, ::2], x[:, :, :, 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotate_pairs(x: Tensor) -> Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rotate_chunks(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def partial(rope: Rope) -> Rope:
    """NeoX/Phi/GPT-J partial rotary: rotate the first half of the features, pass the rest through."""

    def fn(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = cos.shape[-1]
        return torch.cat([rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)

    return fn


# name -> (rope, layout, partial rotary)
SPELLINGS: dict[str, tuple[Rope, str, bool]] = {
    "llama": (lambda x, c, s: x * c + rotate_half(x) * s, "rotate_half", False),
    "commuted": (lambda x, c, s: s * rotate_half(x) + c * x, "rotate_half", False),
    "chunk_halves": (lambda x, c, s: x * c + rotate_chunks(x) * s, "rotate_half", False),
    "gptj": (lambda x, c, s: x * c + rotate_every_two(x) * s, "interleaved", False),
    "unflatten_pairs": (lambda x, c, s: (x * c) + (rotate_pairs(x) * s), "interleaved", False),
    "neox_partial": (partial(lambda x, c, s: x * c + rotate_half(x) * s), "rotate_half", True),
    "gptj_partial": (partial(lambda x, c, s: x * c + rotate_every_two(x) * s), "interleaved", True),
}


def tables(seq: int, width: int, layout: str, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [1, 1, seq, width] laid out for `layout`."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, width, 2, dtype=torch.float64) / width))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), -1) if layout == "rotate_half" else freqs.repeat_interleave(2, -1)
    return emb.cos()[None, None].to(dtype), emb.sin()[None, None].to(dtype)


def _q(seq: int, head_dim: int, dtype: torch.dtype = torch.float32, heads: int = 3) -> Tensor:
    return torch.randn(2, heads, seq, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)


@pytest.mark.parametrize("seq", [1, 17])
@pytest.mark.parametrize("head_dim", [8, 40])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_rope_spellings_fuse(spelling: str, head_dim: int, seq: int) -> None:
    fn, layout, is_partial = SPELLINGS[spelling]
    rotary_dim = head_dim // 2 if is_partial else head_dim
    x, (cos, sin) = _q(seq, head_dim), tables(seq, rotary_dim, layout)
    gm, ctx = run_pass(RopePass(), fn, (x, cos, sin))
    (site,) = ctx.sites
    assert site.status == "fused" and ctx.counters["rope_fused"] == 1
    assert (site.spec.layout, site.spec.rotary_dim, site.spec.head_dim) == (layout, rotary_dim, head_dim)
    assert site.spec.shape == (2, 3, seq, head_dim) and site.spec.dtype == "float32"
    (node,) = tilefuse_nodes(gm, "rope")
    assert node.name == site.node and node.meta["tilefuse_spec"] == site.spec
    assert [a.op if hasattr(a, "op") else a for a in node.args] == [
        "placeholder",
        "placeholder",
        "placeholder",
        0 if layout == "rotate_half" else 1,
        rotary_dim,
    ]
    assert not ops_in(gm) & {"aten.cat", "aten.stack", "aten.neg", "aten.slice", "aten.mul", "aten.add"}
    assert_same(gm(x, cos, sin), fn(x, cos, sin))


@pytest.mark.parametrize("spelling", ["llama", "gptj", "neox_partial"])
def test_rope_bf16_is_no_worse_than_eager(spelling: str) -> None:
    fn, layout, is_partial = SPELLINGS[spelling]
    head_dim, seq = 64, 17
    cos, sin = tables(seq, head_dim // 2 if is_partial else head_dim, layout, torch.float64)
    x = _q(seq, head_dim, torch.float64) * 4
    args16 = (x.bfloat16(), cos.bfloat16(), sin.bfloat16())
    gm, ctx = run_pass(RopePass(), fn, args16)
    assert ctx.counters["rope_fused"] == 1
    ours, eager = gm(*args16), fn(*args16)
    assert ours.dtype == eager.dtype == torch.bfloat16
    assert_no_worse_than_eager(ours, eager, fn(x, cos, sin), floor=1e-3)


def test_dynamic_sequence_length_is_none_in_the_spec() -> None:
    """Through Dynamo with a symbolic sequence length: still one site, and the Spec marks that dim dynamic."""
    specs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., object]:
        aten_gm, ctx = dynamo_graph_to_aten(gm, example_inputs), PassContext()
        PassManager([RopePass()])(aten_gm, ctx)
        check_graph(aten_gm)
        specs.extend(s.spec for s in ctx.sites if s.status == "fused")
        return aten_gm

    fn = SPELLINGS["neox_partial"][0]
    x, (cos, sin) = _q(9, 16), tables(9, 8, "rotate_half")
    for t in (x, cos, sin):
        torch._dynamo.mark_dynamic(t, 2)
    torch._dynamo.reset()
    assert_same(torch.compile(fn, backend=backend, fullgraph=True)(x, cos, sin), fn(x, cos, sin))
    assert [(s.shape, s.rotary_dim) for s in specs] == [((2, 3, None, 16), 8)]


# ------------------------------------------------------------------------------------------ complex (Meta)
def meta_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """facebookresearch/llama `apply_rotary_emb` on [batch, seq, heads, head_dim] tensors."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def freqs_cis(seq: int, head_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rope_becomes_interleaved_with_shared_tables(dtype: torch.dtype) -> None:
    seq, head_dim = 17, 40
    xq, xk = _q(seq, head_dim, heads=4).transpose(1, 2), _q(seq, head_dim, heads=2).transpose(1, 2)
    args = (xq.to(dtype), xk.to(dtype), freqs_cis(seq, head_dim, torch.complex64))
    gm, ctx = run_pass(RopePass(), meta_rope, args)
    assert [(s.status, s.spec.source, s.spec.layout) for s in ctx.sites] == [("fused", "complex", "interleaved")] * 2
    assert not ops_in(gm) & {"aten.view_as_complex", "aten.mul"}
    q_rope, k_rope = tilefuse_nodes(gm, "rope")
    assert q_rope.args[1:] == k_rope.args[1:]  # one cos/sin pair for Q and K, so attention can absorb both
    if dtype == torch.float32:
        assert_same(gm(*args), meta_rope(*args))
    else:
        golden = meta_rope(xq.double(), xk.double(), freqs_cis(seq, head_dim, torch.complex128))
        for ours, eager, gold in zip(gm(*args), meta_rope(*args), golden, strict=True):
            assert_no_worse_than_eager(ours, eager, gold, floor=1e-3)


# ----------------------------------------------------------------------------------------------- declines
def _rot_reused(x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    rot = rotate_half(x)
    return x * cos + rot * sin, rot


def _wrong_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., :h], x[..., h:]), -1) * sin


def _same_sign(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """[[c, -s], [-s, c]] per pair: both partner terms negative, not a rotation."""
    h = x.shape[-1] // 2
    return x * cos - torch.cat((x[..., h:], x[..., :h]), -1) * sin


# name -> (rope, cos/sin shape change, expected words in the reason)
DECLINES: dict[str, tuple[Callable[..., object], Callable[[Tensor], Tensor], str]] = {
    "cos_grows_x": (SPELLINGS["llama"][0], lambda t: t[None], "without growing it"),
    "rotation_reused": (_rot_reused, lambda t: t, "intermediate cat is used outside the rope"),
    "same_sign": (_same_sign, lambda t: t, "have the same sign"),
}


@pytest.mark.parametrize("name", sorted(DECLINES))
def test_declines_with_a_reason_and_leaves_the_graph(name: str) -> None:
    fn, reshape_table, words = DECLINES[name]
    cos, sin = (reshape_table(t) for t in tables(5, 8, "rotate_half"))
    x = _q(5, 8)
    gm, ctx = run_pass(RopePass(), fn, (x, cos, sin))
    assert [s.status for s in ctx.sites] == ["declined"] and ctx.counters["rope_declined"] == 1
    assert words in reasons(ctx)[0]
    assert "aten.cat" in ops_in(gm) and "tilefuse.rope" not in ops_in(gm)
    assert_same(gm(x, cos, sin), fn(x, cos, sin))


def _wrong_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., :h], x[..., h:]), -1) * sin


# Not rotations of features at all: no site.
NOT_CANDIDATES: dict[str, Callable[..., object]] = {
    "wrong_halves": _wrong_halves,  # x·(cos ∓ sin): each feature reads only itself
    "rotates_another_tensor": lambda x, c, s: (x + 1) * c + rotate_half(x) * s,  # affine in x
}


@pytest.mark.parametrize("name", sorted(NOT_CANDIDATES))
def test_no_rotation_is_no_site(name: str) -> None:
    fn = NOT_CANDIDATES[name]
    cos, sin = tables(5, 8, "rotate_half")
    gm, ctx = run_pass(RopePass(), fn, (_q(5, 8), cos, sin))
    assert ctx.sites == [] and "tilefuse.rope" not in ops_in(gm)


def _mlp_blocks(h: Tensor, w: Tensor, g: Tensor) -> Tensor:
    """Residual adds, gated activations, scaled sums: anchors of the pass with nothing behind them to pair features."""
    for _ in range(2):
        y = h @ w
        y = y * torch.sigmoid(y) * 0.5 + y.tanh() * 0.25 - y / 3
        h = h + y * g
    return h


def _mlp_inputs() -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return _q(5, 8), torch.randn(8, 8, generator=g) / 4, torch.randn(8, generator=g)


# name -> (function, its inputs, whether some x behind an anchor is evaluated)
EVALUATED: dict[str, tuple[Callable[..., Tensor], Callable[[], tuple[Tensor, ...]], bool]] = {
    "mlp_blocks": (_mlp_blocks, _mlp_inputs, False),
    "llama": (SPELLINGS["llama"][0], lambda: (_q(5, 8), *tables(5, 8, "rotate_half")), True),
}


@pytest.mark.parametrize("name", sorted(EVALUATED))
def test_candidates_are_evaluated_only_behind_an_op_that_pairs_features(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evaluating every tensor behind every add as a candidate x cost more than the rest of the pipeline on graphs
    without RoPE; an anchor with no cat, stack, slice, unbind, sum or complex view behind it is no rotation."""
    fn, inputs, evaluated = EVALUATED[name]
    built: list[str] = []
    real = rope_match.LinearEvaluator

    def counting(x: fx.Node, order: dict[fx.Node, int]) -> rope_match.LinearEvaluator:
        built.append(x.name)
        return real(x, order)

    monkeypatch.setattr(rope_match, "LinearEvaluator", counting)
    args = inputs()
    gm, ctx = run_pass(RopePass(), fn, args)
    assert bool(built) == evaluated
    assert [s.status for s in ctx.sites] == (["fused"] if evaluated else [])
    assert_same(gm(*args), fn(*args))


# Rotations the recognizer reads by meaning: a table constant across features, a scaled rotation (xpos).
SCALED: dict[str, tuple[Callable[..., object], Callable[[Tensor], Tensor]]] = {
    "cos_constant_across_features": (SPELLINGS["llama"][0], lambda t: t[..., :1]),
    "scaled_cos": (lambda x, c, s: (x * 2) * c + rotate_half(x) * s, lambda t: t),
}


@pytest.mark.parametrize("name", sorted(SCALED))
def test_rotation_with_broadcast_or_scaled_coefficients_fuses(name: str) -> None:
    fn, reshape_table = SCALED[name]
    cos, sin = (reshape_table(t) for t in tables(5, 8, "rotate_half"))
    x = _q(5, 8)
    gm, ctx = run_pass(RopePass(), fn, (x, cos, sin))
    assert [s.status for s in ctx.sites] == ["fused"]
    assert_same(gm(x, cos, sin), fn(x, cos, sin))


def test_disabled_rope_is_not_touched() -> None:
    x, (cos, sin) = _q(5, 8), tables(5, 8, "rotate_half")
    gm, ctx = run_pass(RopePass(), SPELLINGS["llama"][0], (x, cos, sin), PassContext(enabled=frozenset({"rmsnorm"})))
    assert ctx.sites == [] and "aten.cat" in ops_in(gm)


# ------------------------------------------------------------------------------------- Hugging Face models
# name -> (layout, rotary_dim, head_dim); every model has 2 layers, so 4 sites (Q and K per layer)
HF_ROPES = {
    "llama": ("rotate_half", 16, 16),
    "gemma": ("rotate_half", 16, 16),
    "gptj": ("interleaved", 8, 16),
    "neox": ("rotate_half", 8, 16),
    "phi": ("rotate_half", 8, 16),
}


@pytest.mark.parametrize("name", sorted(HF_ROPES))
def test_hf_model_ropes_all_fuse(name: str) -> None:
    model, ids = hf_model(name), hf_inputs()
    gm, ctx = run_pass(RopePass(), model, (ids,))
    fused = sites(ctx, "rope", "fused")
    assert len(fused) == 4 and reasons(ctx) == []
    assert {(s.spec.layout, s.spec.rotary_dim, s.spec.head_dim) for s in fused} == {HF_ROPES[name]}
    assert "aten.neg" not in ops_in(gm)
    q_ropes, k_ropes = tilefuse_nodes(gm, "rope")[0::2], tilefuse_nodes(gm, "rope")[1::2]
    assert all(q.args[1:] == k.args[1:] for q, k in zip(q_ropes, k_ropes, strict=True))  # attention can absorb
    assert_same(gm(ids), model(ids), atol=1e-4, rtol=1e-4)
