"""RoPE spellings of current transformers models: written on two views of x with per-pair tables (GPT-OSS,
DeepSeek-V3, Mistral-Large-4), full rotary written as partial (Phi-3), pairs by unbind (SAM). Each is one
tilefuse::rope whose value and gradients are the module's; look-alikes that are no rotation are left alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _helpers import run_pass, sites, tilefuse_nodes
from torch import Tensor

from tilefuse.passes.rope import RopePass

Rope = Callable[[Tensor, Tensor, Tensor], Tensor]


def chunked_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers gpt_oss `_apply_rotary_emb`."""
    first, second = torch.chunk(x, 2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def even_odd(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers deepseek_v3 `apply_rotary_pos_emb_interleave`: interleaved pairs in, halves out."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def even_odd_commuted(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.cat([cos * x1 - sin * x2, x1 * sin + cos * x2], dim=-1)


def sign_swapped(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """A rotation by -angle written with the halves swapped: not the pattern (b·cos + a·sin is a·sin + b·cos
    only when the same views are used), so it must not be fused as one."""
    first, second = torch.chunk(x, 2, dim=-1)
    return torch.cat((first * cos - second * sin, first * cos + second * sin), dim=-1)


def _inputs(d: int = 16, grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, d, generator=gen, dtype=torch.float64)
    angle = torch.randn(1, 1, 7, d // 2, generator=gen, dtype=torch.float64)
    return x.requires_grad_(grad), angle.cos().requires_grad_(grad), angle.sin().requires_grad_(grad)


@pytest.mark.parametrize(
    ("fn", "source"),
    [(chunked_halves, "split_halves"), (even_odd, "split_pairs"), (even_odd_commuted, "split_pairs")],
)
@pytest.mark.parametrize("d", [8, 16, 6])
def test_split_rotation_fuses_and_matches(fn: Rope, source: str, d: int) -> None:
    inputs = _inputs(d)
    gm, ctx = run_pass(RopePass(), fn, inputs)
    (site,) = sites(ctx, "rope", "fused")
    assert (site.spec.source, site.spec.layout, site.spec.rotary_dim) == (source, "rotate_half", d)
    assert len(tilefuse_nodes(gm, "rope")) == 1
    torch.testing.assert_close(gm(*inputs), fn(*inputs), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("fn", [chunked_halves, even_odd])
def test_split_rotation_gradients_match(fn: Rope) -> None:
    gm, _ = run_pass(RopePass(), fn, _inputs())
    ours, eager = _inputs(grad=True), _inputs(grad=True)
    weight = torch.randn(2, 3, 7, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (gm(*ours) * weight).sum().backward()
    (fn(*eager) * weight).sum().backward()
    for a, b in zip(ours, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)


def test_q_and_k_share_the_doubled_tables() -> None:
    """Both sites name the same cos/sin nodes, which lets the attention pass fold them into attention."""

    def qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        return chunked_halves(q, cos, sin), chunked_halves(k, cos, sin)

    x, cos, sin = _inputs()
    gm, ctx = run_pass(RopePass(), qk, (x, x.flip(0), cos, sin))
    first, second = tilefuse_nodes(gm, "rope")
    assert len(sites(ctx, "rope", "fused")) == 2 and first.args[1:3] == second.args[1:3]


def test_a_look_alike_is_not_fused() -> None:
    inputs = _inputs()
    gm, ctx = run_pass(RopePass(), sign_swapped, inputs)
    assert not tilefuse_nodes(gm, "rope") and not sites(ctx, "rope", "fused")
    assert (
        "not a rotation: features (0, 8) scale themselves by different tables"
        in sites(ctx, "rope", "declined")[0].reason
    )
    torch.testing.assert_close(gm(*inputs), sign_swapped(*inputs))


def rotate_half(x: Tensor) -> Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


def full_rotary_as_partial(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Phi-3: `cat([rope(x[..., :r]), x[..., r:]])` with r the whole head (`x[..., :r]` traces as alias(x))."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def test_full_rotary_written_as_partial_is_one_rope() -> None:
    """Nothing but the rope op is left between x and the output, so the attention pass can absorb it."""
    gen = torch.Generator().manual_seed(0)
    x, angle = torch.randn(2, 3, 7, 16, generator=gen), torch.randn(1, 1, 7, 16, generator=gen)
    inputs = (x, angle.cos(), angle.sin())
    gm, ctx = run_pass(RopePass(), full_rotary_as_partial, inputs)
    (node,) = tilefuse_nodes(gm, "rope")
    assert node.args[0].op == "placeholder" and next(iter(node.users)).op == "output"
    assert sites(ctx, "rope", "fused")[0].spec.rotary_dim == 16
    torch.testing.assert_close(gm(*inputs), full_rotary_as_partial(*inputs), atol=1e-6, rtol=1e-6)


def rotate_pairwise(x: Tensor) -> Tensor:
    """SAM 2/3: pairs by a view to [..., d/2, 2], then unbind."""
    x1, x2 = x.view(*x.shape[:-1], -1, 2).unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(start_dim=-2)


def test_pairwise_rotation_by_unbind_fuses() -> None:
    gen = torch.Generator().manual_seed(0)
    x, angle = torch.randn(2, 3, 7, 16, generator=gen), torch.randn(1, 1, 7, 8, generator=gen)
    cos, sin = (t.repeat_interleave(2, dim=-1) for t in (angle.cos(), angle.sin()))

    def fn(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return x * cos + rotate_pairwise(x) * sin

    gm, ctx = run_pass(RopePass(), fn, (x, cos, sin))
    (site,) = sites(ctx, "rope", "fused")
    assert (site.spec.layout, site.spec.rotary_dim) == ("interleaved", 16)
    torch.testing.assert_close(gm(x, cos, sin), fn(x, cos, sin), atol=1e-6, rtol=1e-6)
