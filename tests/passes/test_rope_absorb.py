"""RoPE absorbed through a head permute: GPT-J rotates [B, N, H, D] tensors and then permutes them to
[B, H, N, D]; the attention op then reads the permuted pre-rope tensors and cos/sin permuted the same way."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from _helpers import run_pass, sites, tilefuse_nodes
from torch import Tensor, nn

import tilefuse
from tilefuse.compiler.presets import load_model
from tilefuse.passes.attention import AttentionPass
from tilefuse.passes.base import PassContext
from tilefuse.passes.canonicalize import CanonicalizePass
from tilefuse.passes.manager import PassManager
from tilefuse.passes.rope import RopePass

PIPELINE = PassManager([CanonicalizePass(), RopePass(), AttentionPass()])
B, N, H, D = 2, 9, 4, 16


def rotate_every_two(x: Tensor) -> Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


ROTATE = {"interleaved": rotate_every_two, "rotate_half": rotate_half}


def tables(layout: str, rotary_dim: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """cos/sin for N positions, reshaped to `shape` (its last two non-1 sizes are N and rotary_dim)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = torch.outer(torch.arange(N, dtype=torch.float32), inv_freq)
    emb = freqs.repeat_interleave(2, -1) if layout == "interleaved" else torch.cat((freqs, freqs), -1)
    return emb.cos().reshape(shape), emb.sin().reshape(shape)


@dataclass(frozen=True)
class Variant:
    layout: str = "interleaved"
    rotary_dim: int = D
    to_heads: str = "permute"  # or "transpose"
    table_shape: tuple[int, ...] = (1, N, 1, -1)  # cos/sin as laid out against [B, N, H, D]
    sdpa: bool = False


class HeadLastRope(nn.Module):
    """RoPE on [B, N, H, D] queries and keys, then [B, H, N, D] causal attention."""

    def __init__(self, variant: Variant) -> None:
        super().__init__()
        self.variant = variant

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = self.variant.rotary_dim
        rotated = x[..., :r] * cos + ROTATE[self.variant.layout](x[..., :r]) * sin
        return rotated if r == x.shape[-1] else torch.cat([rotated, x[..., r:]], dim=-1)

    def to_heads(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 1, 3) if self.variant.to_heads == "permute" else x.transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k = (self.to_heads(self.rope(t, cos, sin)) for t in (q, k))
        if self.variant.sdpa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        keep = torch.ones(N, N, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ v


def inputs_for(variant: Variant, seed: int = 0) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, N, H, D, generator=gen) for _ in range(2))
    v = torch.randn(B, H, N, D, generator=gen)
    return (q, k, v, *tables(variant.layout, variant.rotary_dim, variant.table_shape))


def fuse(module: Callable[..., Any], inputs: tuple[Tensor, ...]) -> tuple[fx.GraphModule, PassContext]:
    return run_pass(PIPELINE, module, inputs)


def attention_site(ctx: PassContext) -> Any:
    (site,) = sites(ctx, "attention", "fused")
    assert not sites(ctx, "attention", "declined"), ctx.sites
    return site


# ------------------------------------------------------------------------------------------------ absorbed
ABSORBED = {
    "gptj": Variant(),
    "gptj_partial": Variant(rotary_dim=8),
    "transpose": Variant(to_heads="transpose"),
    "rotate_half": Variant(layout="rotate_half"),
    "rank3_tables": Variant(table_shape=(N, 1, -1)),
    "sdpa": Variant(sdpa=True),
}


@pytest.mark.parametrize("name", sorted(ABSORBED))
def test_rope_before_head_permute_is_absorbed(name: str) -> None:
    variant = ABSORBED[name]
    module, inputs = HeadLastRope(variant), inputs_for(variant)
    gm, ctx = fuse(module, inputs)
    site = attention_site(ctx)
    rope = site.spec.rope
    assert rope is not None and site.spec.causal
    assert (rope.layout, rope.rotary_dim, rope.shape) == (variant.layout, variant.rotary_dim, (B, H, N, D))
    assert not tilefuse_nodes(gm, "rope")  # both rope ops now run inside the attention
    assert [s.detail.get("fused_into") for s in sites(ctx, "rope", "fused")] == [site.node, site.node]
    (node,) = tilefuse_nodes(gm, "attention")
    q, k, cos = node.args[0], node.args[1], node.args[5]
    assert q.meta["val"].shape == k.meta["val"].shape == (B, H, N, D)
    assert cos.meta["val"].shape == (1, 1, N, variant.rotary_dim)  # broadcasts over batch and heads
    torch.testing.assert_close(gm(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- not absorbed
class RopeOutputReused(HeadLastRope):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Any:  # type: ignore[override]
        q_rot = self.rope(q, cos, sin)
        q4, k4 = self.to_heads(q_rot), self.to_heads(self.rope(k, cos, sin))
        return (q4 @ k4.transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ v, q_rot.sum()


class OnlyQueryRotated(HeadLastRope):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q4, k4 = self.to_heads(self.rope(q, cos, sin)), self.to_heads(k)
        return (q4 @ k4.transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ v


def per_head_inputs() -> tuple[Tensor, ...]:
    """cos/sin that differ per head ([1, N, H, D]): a rotation per head is not what the kernel's cos/sin mean."""
    q, k, v, cos, sin = inputs_for(Variant())
    scale = torch.linspace(0.5, 1.0, H)[None, None, :, None]
    return q, k, v, cos * scale, sin * scale


NOT_ABSORBED: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Tensor, ...]]]] = {
    "rope_output_reused": (lambda: RopeOutputReused(Variant()), lambda: inputs_for(Variant())),
    "only_query_rotated": (lambda: OnlyQueryRotated(Variant()), lambda: inputs_for(Variant())),
    "tables_vary_per_head": (lambda: HeadLastRope(Variant()), per_head_inputs),
}


@pytest.mark.parametrize("name", sorted(NOT_ABSORBED))
def test_rope_stays_a_separate_op(name: str) -> None:
    factory, make_inputs = NOT_ABSORBED[name]
    module, inputs = factory(), make_inputs()
    gm, ctx = fuse(module, inputs)
    assert attention_site(ctx).spec.rope is None
    assert tilefuse_nodes(gm, "rope") and not any(s.detail.get("fused_into") for s in ctx.sites)
    torch.testing.assert_close(gm(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ torch.compile, fwd and bwd
class ProjectedGptjAttention(nn.Module):
    """Trainable projections around GPT-J-style partial interleaved RoPE and causal attention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = nn.Linear(H * D, 3 * H * D), nn.Linear(H * D, H * D)
        self.attend = HeadLastRope(Variant(rotary_dim=8))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k, v = self.qkv(x).view(B, N, 3, H, D).unbind(2)
        out = self.attend(q, k, v.transpose(1, 2), cos, sin)
        return self.out(out.transpose(1, 2).reshape(B, N, H * D))


def _forward_backward(model: nn.Module, fn: Callable[..., Tensor], inputs: tuple[Any, ...]) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    out = fn(*inputs)
    out.square().mean().backward()
    return [out.detach()] + [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def test_compiled_absorbed_rope_forward_and_backward_match_eager() -> None:
    torch._dynamo.reset()
    model = ProjectedGptjAttention()
    x = torch.randn(B, N, H * D, generator=torch.Generator().manual_seed(0))
    inputs = (x, *tables("interleaved", 8, (1, N, 1, -1)))
    expected = _forward_backward(model, model, inputs)
    backend = tilefuse.TilefuseBackend(tilefuse.Options(strict=True, inner="eager"))
    actual = _forward_backward(model, torch.compile(model, backend=backend, fullgraph=True), inputs)
    assert len(actual) == len(expected) == 5
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    (site,) = backend.report.by_kind("attention")
    assert site.status == "fused" and site.spec.rope is not None


def test_gptj_preset_runs_rope_inside_attention() -> None:
    report = tilefuse.explain(*load_model("hf:gptj", seq=8), strict=True)
    attention = report.by_kind("attention")
    assert len(attention) == 2 and all(s.status == "fused" and s.spec.rope is not None for s in attention)
    assert all(s.spec.rope.layout == "interleaved" and s.spec.rope.rotary_dim == 8 for s in attention)
    ropes = report.by_kind("rope")
    assert len(ropes) == 4 and all(s.detail.get("fused_into") for s in ropes)
