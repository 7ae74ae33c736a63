"""ALiBi: a bias slope[h]·(k - q), or any spelling equal to it up to a per-row constant, reaches the attention op
as [H] (or [B, H]) slopes instead of an N×N mask; biases that only look like ALiBi stay additive masks, with the
reason recorded on the site."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from _helpers import as_double, assert_no_worse_than_eager, run_pass, sites, tilefuse_nodes
from torch import Tensor, nn

import tilefuse
from tilefuse.compiler.presets import HFOutput, load_model, padding_mask
from tilefuse.passes.attention import AttentionPass
from tilefuse.passes.base import PassContext
from tilefuse.passes.canonicalize import CanonicalizePass
from tilefuse.passes.manager import PassManager

PIPELINE = PassManager([CanonicalizePass(), AttentionPass()])
B, H, D = 2, 4, 16
MAX_LEN = 24
SHAPES = [(1, 1), (17, 17), (5, 17), (17, 5)]  # (nq, nk)
Bias = Callable[[Tensor, int, int], Tensor]


def alibi_slopes(heads: int = H) -> Tensor:
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)


def positions(nq: int, nk: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """(query index [nq, 1] + offset, key index [1, nk])."""
    return torch.arange(nq)[:, None] + offset, torch.arange(nk)[None, :]


# ---------------------------------------------------------------------------------------- bias spellings
def k_minus_q(slopes: Tensor, nq: int, nk: int) -> Tensor:
    q_idx, k_idx = positions(nq, nk)
    return slopes.view(1, -1, 1, 1) * (k_idx - q_idx)


def k_minus_q_bottom_right(slopes: Tensor, nq: int, nk: int) -> Tensor:
    q_idx, k_idx = positions(nq, nk, offset=nk - nq)
    return slopes.view(1, -1, 1, 1) * (k_idx - q_idx)


def key_only(slopes: Tensor, nq: int, nk: int) -> Tensor:
    return slopes[:, None, None] * torch.arange(nk)


def neg_q_minus_k(slopes: Tensor, nq: int, nk: int) -> Tensor:
    q_idx, k_idx = positions(nq, nk)
    return -(slopes.view(1, -1, 1, 1) * (q_idx - k_idx))


def doubled_keys(slopes: Tensor, nq: int, nk: int) -> Tensor:
    """slope · 2k: the op gets 2·slope."""
    return slopes[:, None, None] * (2 * torch.arange(nk))


def mpt(slopes: Tensor, nq: int, nk: int) -> Tensor:
    """MPT: slopes · arange(1 - L, 1) over a max length L, sliced to the last nk keys."""
    alibi = (torch.arange(1 - MAX_LEN, 1).view(1, 1, 1, MAX_LEN) * slopes.view(1, -1, 1, 1)).squeeze(0)
    return alibi[:, max(0, alibi.size(1) - nq) :, max(0, alibi.size(2) - nk) :]


def per_batch(slopes: Tensor, nq: int, nk: int) -> Tensor:
    scales = torch.tensor([1.0, 0.5])[:, None]
    return (scales * slopes).view(B, -1, 1, 1) * positions(nq, nk)[1]


# not ALiBi, or not provably so
def symmetric(slopes: Tensor, nq: int, nk: int) -> Tensor:
    q_idx, k_idx = positions(nq, nk)
    return -slopes.view(1, -1, 1, 1) * (q_idx - k_idx).abs()


def query_only(slopes: Tensor, nq: int, nk: int) -> Tensor:
    return slopes.view(1, -1, 1, 1) * positions(nq, nk)[0]


def per_key_weights(slopes: Tensor, nq: int, nk: int) -> Tensor:
    return (torch.linspace(0.1, 1.0, nk) * torch.arange(nk))[None]


class AlibiAttention(nn.Module):
    """softmax(q·kᵀ/√d + bias [+ causal]) v with the slopes as a buffer (a constant when captured)."""

    def __init__(self, bias: Bias, causal: bool = False, sdpa: bool = False, slopes: Tensor | None = None) -> None:
        super().__init__()
        self.bias, self.causal, self.sdpa = bias, causal, sdpa
        self.register_buffer("slopes", alibi_slopes() if slopes is None else slopes)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        nq, nk = q.shape[-2], k.shape[-2]
        bias = self.bias(self.slopes, nq, nk).to(q.dtype)
        if self.causal:
            q_idx, k_idx = positions(nq, nk)
            bias = bias.masked_fill(k_idx > q_idx, float("-inf"))
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias).softmax(-1) @ v


def qkv(nq: int, nk: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=gen) for n in (nq, nk, nk))  # type: ignore[return-value]


def fuse(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[fx.GraphModule, PassContext]:
    return run_pass(PIPELINE, module, inputs)


def only_spec(ctx: PassContext) -> Any:
    (site,) = sites(ctx, "attention", "fused")
    assert not sites(ctx, "attention", "declined"), ctx.sites
    return site


def op_args(gm: fx.GraphModule) -> tuple[Any, ...]:
    (node,) = tilefuse_nodes(gm, "attention")
    return tuple(node.args)


def slopes_shape(gm: fx.GraphModule) -> tuple[int, ...] | None:
    slopes = op_args(gm)[4]
    return tuple(slopes.meta["val"].shape) if slopes is not None else None


# ------------------------------------------------------------------------------------------------ positives
POSITIVE: dict[str, tuple[Bias, tuple[int, ...]]] = {
    "k_minus_q": (k_minus_q, (H,)),
    "k_minus_q_bottom_right": (k_minus_q_bottom_right, (H,)),
    "key_only": (key_only, (H,)),
    "neg_q_minus_k": (neg_q_minus_k, (H,)),
    "doubled_keys": (doubled_keys, (H,)),
    "mpt": (mpt, (H,)),
    "per_batch": (per_batch, (B, H)),
}


@pytest.mark.parametrize(("nq", "nk"), SHAPES)
@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_alibi_spelling_becomes_slopes(name: str, nq: int, nk: int) -> None:
    bias, shape = POSITIVE[name]
    module, inputs = AlibiAttention(bias), qkv(nq, nk)
    gm, ctx = fuse(module, inputs)
    site = only_spec(ctx)
    assert site.spec.alibi and site.spec.mask == "none" and not site.detail
    assert op_args(gm)[3] is None and slopes_shape(gm) == shape  # no N×N bias, only the slopes
    torch.testing.assert_close(gm(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
def test_alibi_with_causal_mask_keeps_both(sdpa: bool) -> None:
    module, inputs = AlibiAttention(k_minus_q, causal=True, sdpa=sdpa), qkv(17, 17)
    gm, ctx = fuse(module, inputs)
    spec = only_spec(ctx).spec
    assert (spec.alibi, spec.causal, spec.mask) == (True, True, "none")
    torch.testing.assert_close(gm(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)


def test_bf16_alibi_is_no_worse_than_eager() -> None:
    """The kernel adds slope·(k - q) in fp32; eager rounds the bias to bf16 first."""
    module, inputs = AlibiAttention(k_minus_q, causal=True), qkv(17, 17)
    low = tuple(t.bfloat16() for t in inputs)
    gm, ctx = fuse(module, low)
    assert only_spec(ctx).spec.alibi
    golden = as_double(module)(*(t.double() for t in inputs))
    assert_no_worse_than_eager(gm(*low), module(*low), golden, floor=1e-3)


def test_alibi_with_grouped_kv_heads() -> None:
    def gqa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
        return (q @ k.transpose(-2, -1) / math.sqrt(D) + key_only(alibi_slopes(), 1, k.shape[-2])).softmax(-1) @ v

    q, k, v = qkv(9, 9)
    inputs = (q, k[:, :2], v[:, :2])
    gm, ctx = fuse(gqa, inputs)
    spec = only_spec(ctx).spec
    assert spec.alibi and spec.gqa_group == 2 and slopes_shape(gm) == (H,)
    torch.testing.assert_close(gm(*inputs), gqa(*inputs), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- BLOOM: heads in the batch
class BloomStyle(nn.Module):
    """BLOOM: [B*H, 1, N] alibi fed to baddbmm on [B*H, N, D] operands, scores viewed per head for the mask."""

    def __init__(self, alibi: Callable[[int, int], Tensor]) -> None:
        super().__init__()
        self.alibi = alibi

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        nq, nk = q.shape[-2], k.shape[-2]
        q_idx, k_idx = positions(nq, nk)
        causal_bias = torch.where(k_idx <= q_idx, 0.0, torch.finfo(torch.float32).min)
        q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
        scores = self.alibi(B, nk).baddbmm(q3, k3.transpose(-1, -2), beta=1.0, alpha=1 / math.sqrt(D))
        probs = F.softmax(scores.view(B, H, nq, -1) + causal_bias, dim=-1, dtype=torch.float32)
        return torch.bmm(probs.view(B * H, nq, -1), v3).view(B, H, nq, D)


def bloom_unpadded(batch: int, nk: int) -> Tensor:
    return (alibi_slopes()[:, None, None] * torch.arange(nk)).repeat(batch, 1, 1)


def bloom_from_mask(batch: int, nk: int) -> Tensor:
    transformers = pytest.importorskip("transformers")
    return transformers.models.bloom.modeling_bloom.build_alibi_tensor(torch.ones(batch, nk), H, torch.float32)


def test_bloom_folded_heads_alibi_becomes_slopes() -> None:
    module, inputs = BloomStyle(bloom_unpadded), qkv(13, 13)
    gm, ctx = fuse(module, inputs)
    spec = only_spec(ctx).spec
    assert (spec.alibi, spec.causal, spec.mask, spec.q_heads, spec.batch) == (True, True, "none", H, B)
    assert slopes_shape(gm) == (H,)
    torch.testing.assert_close(gm(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)


def test_bloom_positions_from_an_all_ones_mask_built_in_the_graph_become_slopes() -> None:
    """transformers before 5.2x build an all-ones mask when none is passed and take cumsum(mask) - 1 as the ALiBi
    positions: the cumsum of a constant is an arange, so the bias is proven ALiBi (a mask that is an input, i.e.
    data, stays additive: test_positions_from_attention_mask_cumsum_stay_additive)."""
    module, inputs = BloomStyle(bloom_from_mask), qkv(13, 13)
    gm, ctx = fuse(module, inputs)
    spec = only_spec(ctx).spec
    assert (spec.alibi, spec.causal, spec.mask, spec.q_heads, spec.batch) == (True, True, "none", H, B)
    assert slopes_shape(gm) == (H,)
    torch.testing.assert_close(gm(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)


def test_cumsum_of_an_all_ones_mask_that_is_written_stays_additive() -> None:
    def written(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        mask = torch.ones(B, k.shape[-2])
        mask[:, :2] = 0  # left padding written into the "constant": positions are data again
        pos = (mask.cumsum(-1) - 1) * mask
        bias = alibi_slopes().view(1, H, 1, 1) * pos[:, None, None, :]
        return (q @ k.transpose(-2, -1) / math.sqrt(D) + bias).softmax(-1) @ v

    inputs = qkv(9, 9)
    gm, ctx = fuse(written, inputs)
    assert not only_spec(ctx).spec.alibi
    torch.testing.assert_close(gm(*inputs), written(*inputs), atol=1e-5, rtol=1e-5)


def test_three_d_bmm_alibi_gets_per_batch_head_slopes() -> None:
    def three_d(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
        bias = alibi_slopes().repeat(B)[:, None, None] * torch.arange(k3.shape[1])
        return torch.bmm((torch.bmm(q3, k3.transpose(1, 2)) / 4 + bias).softmax(-1), v3)

    inputs = qkv(7, 7)
    gm, ctx = fuse(three_d, inputs)
    spec = only_spec(ctx).spec
    assert spec.alibi and spec.q_heads == 1 and slopes_shape(gm) == (B * H, 1)
    torch.testing.assert_close(gm(*inputs), three_d(*inputs), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ negatives
NEGATIVE: dict[str, tuple[Callable[[], nn.Module], str | None]] = {
    "symmetric": (lambda: AlibiAttention(symmetric), "symmetric"),
    "query_only": (lambda: AlibiAttention(query_only), None),
    "per_key_weights": (lambda: AlibiAttention(per_key_weights), None),
    "trainable_slopes": (lambda: TrainableSlopes(), "parameter"),
}


class TrainableSlopes(AlibiAttention):
    def __init__(self) -> None:
        super().__init__(k_minus_q)
        self.learned = nn.Parameter(alibi_slopes())

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        bias = k_minus_q(self.learned, q.shape[-2], k.shape[-2])
        return (q @ k.transpose(-2, -1) / math.sqrt(D) + bias).softmax(-1) @ v


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_bias_that_is_not_provably_alibi_stays_additive(name: str) -> None:
    factory, reason = NEGATIVE[name]
    module, inputs = factory(), qkv(9, 9)
    gm, ctx = fuse(module, inputs)
    site = only_spec(ctx)
    assert not site.spec.alibi and site.spec.mask == "additive" and op_args(gm)[4] is None
    notes = site.detail.get("alibi_kept_additive", [])
    assert (reason is None and not notes) or (reason is not None and reason in notes[0]), notes
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)


def test_positions_from_attention_mask_cumsum_stay_additive() -> None:
    def from_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        pos = (mask.cumsum(-1) - 1) * mask
        bias = alibi_slopes().view(1, H, 1, 1) * pos[:, None, None, :]
        return (q @ k.transpose(-2, -1) / math.sqrt(D) + bias).softmax(-1) @ v

    inputs = (*qkv(9, 9), torch.ones(B, 9))
    gm, ctx = fuse(from_mask, inputs)
    site = only_spec(ctx)
    assert not site.spec.alibi and "cumsum" in site.detail["alibi_kept_additive"][0]
    torch.testing.assert_close(gm(*inputs), from_mask(*inputs), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ torch.compile, fwd and bwd
class ProjectedAlibi(nn.Module):
    """Trainable projections around causal ALiBi attention whose slopes are computed from constants."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = nn.Linear(H * D, 3 * H * D), nn.Linear(H * D, H * D)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        q, k, v = self.qkv(x).view(B, n, 3, H, D).permute(2, 0, 3, 1, 4)
        slopes = torch.pow(torch.full((), 0.5), torch.arange(1, H + 1))
        q_idx, k_idx = positions(n, n)
        bias = (slopes.view(1, H, 1, 1) * (k_idx - q_idx)).masked_fill(k_idx > q_idx, float("-inf"))
        probs = (q @ k.transpose(-2, -1) / math.sqrt(D) + bias).softmax(-1)
        return self.out((probs @ v).transpose(1, 2).reshape(B, n, H * D))


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _forward_backward(model: nn.Module, fn: Callable[..., Tensor], inputs: tuple[Any, ...]) -> tuple[Tensor, ...]:
    model.zero_grad(set_to_none=True)
    out = fn(*inputs)
    out.float().square().mean().backward()
    grads = _grads(model)
    return (out.detach(), *(grads[name] for name in sorted(grads)))


def assert_compiled_matches_eager(model: nn.Module, inputs: tuple[Any, ...]) -> tilefuse.FusionReport:
    torch._dynamo.reset()
    expected = _forward_backward(model, model, inputs)
    backend = tilefuse.TilefuseBackend(tilefuse.Options(strict=True, inner="eager"))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    actual = _forward_backward(model, compiled, inputs)
    assert len(actual) == len(expected)  # every parameter still gets a gradient
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    return backend.report


def test_compiled_alibi_forward_and_backward_match_eager() -> None:
    x = torch.randn(B, 11, H * D, generator=torch.Generator().manual_seed(0))
    report = assert_compiled_matches_eager(ProjectedAlibi(), (x,))
    (site,) = report.by_kind("attention")
    assert site.status == "fused" and site.spec.alibi and site.spec.causal and site.spec.mask == "none"


# ------------------------------------------------------------------------------------------ BLOOM (HF)
class PlainGelu(nn.Module):
    """BLOOM's tanh GELU without its custom autograd.Function."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def test_bloom_preset_fuses_every_site_with_alibi() -> None:
    model, inputs = load_model("hf:bloom")
    report = tilefuse.explain(model, inputs, strict=True)
    specs = [s.spec for s in report.by_kind("attention")]
    assert len(specs) == 2 and all(s.status == "fused" for s in report.by_kind("attention"))
    assert all(s.alibi and s.causal and s.mask == "none" and s.q_heads == 4 for s in specs), specs


def test_bloom_forward_and_backward_match_eager() -> None:
    """GELU swapped for its plain form: one graph, no custom autograd.Function to cut it."""
    model, inputs = load_model("hf:bloom")
    for block in model.model.transformer.h:
        block.mlp.gelu_impl = PlainGelu()
    report = assert_compiled_matches_eager(model, inputs)
    assert all(s.spec.alibi for s in report.by_kind("attention"))


def test_bloom_with_its_custom_autograd_gelu_fuses_between_the_calls() -> None:
    """BLOOM's GeLUFunction (a custom autograd.Function) stays in the graph with its own backward; the attention
    sites on either side of it still fuse with ALiBi, and forward and gradients match eager."""
    report = assert_compiled_matches_eager(*load_model("hf:bloom"))
    specs = [s.spec for s in report.by_kind("attention")]
    assert len(specs) == 2 and all(s.status == "fused" for s in report.by_kind("attention"))
    assert all(s.alibi and s.causal for s in specs), specs
    assert report.counters["graph_declined"] == 0 and not report.fallbacks


def test_padded_bloom_keeps_the_alibi_bias_additive() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)
    torch.manual_seed(0)
    bloom = transformers.BloomForCausalLM._from_config(config, attn_implementation="eager").eval()
    model = HFOutput(bloom, ("input_ids", "attention_mask"), "logits", {"use_cache": False}).eval()
    inputs = (torch.randint(0, 128, (B, 12), generator=torch.Generator().manual_seed(0)), padding_mask(B, 12))
    backend = tilefuse.TilefuseBackend(tilefuse.Options(strict=True, inner="eager"))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(*inputs), model(*inputs), atol=2e-5, rtol=1e-4)
    attention_sites = backend.report.by_kind("attention")
    assert len(attention_sites) == 2
    for site in attention_sites:
        assert site.status == "fused" and not site.spec.alibi and site.spec.mask_shape == (B, H, 1, 12)
        assert "cumsum" in site.detail["alibi_kept_additive"][0]
