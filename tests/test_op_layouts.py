"""Every fused op gives the same forward and gradients whatever the strides of each operand (CPU path).

One operand at a time takes each layout of tests/_layouts.py (transposed, sliced, stride-0 expanded, reversed,
swapped); the call must match the same call on contiguous copies, forward and backward, for attention (q, k, v,
boolean and additive masks, cos/sin, grad_out), RMSNorm and LayerNorm with the residual add (x, weight, bias,
residual, grad_out) and RoPE (x, cos, sin, grad_out), and for a compiled model that hands SDPA transposed K and V.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _layouts import LAYOUTS, strided, values_of
from torch import Tensor

import tilefuse  # noqa: F401  (registers the backend)
from tilefuse import ops

B, HQ, HK, N, D, DV, R = 2, 4, 2, 12, 16, 8, 8
STRIDED = LAYOUTS[1:]  # every layout but contiguous, which the other side of each comparison already is
ATTENTION_OPERANDS = ("q", "k", "v", "bool_mask", "float_mask", "cos", "sin", "grad_out")


def _attention_values(gen: torch.Generator, kv_heads: int = HK, v_dim: int = DV) -> dict[str, Tensor]:
    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    keep = torch.rand(B, 1, N, N, generator=gen) > 0.3
    keep[..., 0] = True  # no fully masked row, so every row has a gradient to compare
    return {
        "q": rand(B, HQ, N, D), "k": rand(B, kv_heads, N, D), "v": rand(B, kv_heads, N, v_dim), "bool_mask": keep,
        "float_mask": rand(B, 1, N, N), "cos": rand(B, 1, N, R), "sin": rand(B, 1, N, R),
        "grad_out": rand(B, HQ, N, v_dim),
    }  # fmt: skip


def _run(fn: Callable[..., Tensor], tensors: dict[str, Tensor], grad_names: tuple[str, ...]) -> list[Tensor]:
    """fn's output and the gradients of `grad_names` (leaves made here) for the upstream grad tensors["grad_out"]."""
    leaves = {n: t.detach().requires_grad_(True) if n in grad_names else t for n, t in tensors.items()}
    out = fn(leaves)
    out.backward(tensors["grad_out"])
    grads = [leaves[n].grad for n in grad_names]
    assert all(g is not None for g in grads)
    return [out.detach(), *grads]  # type: ignore[list-item]


def _assert_layout_invariant(
    fn: Callable[..., Tensor], values: dict[str, Tensor], operand: str, layout: str, grad_names: tuple[str, ...]
) -> None:
    plain = dict(values)
    plain[operand] = values_of(values[operand], layout)
    laid_out = dict(plain)
    laid_out[operand] = strided(values[operand], layout)
    for got, want in zip(_run(fn, laid_out, grad_names), _run(fn, plain, grad_names), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def _attention(mask: str | None, rope: bool) -> Callable[[dict[str, Tensor]], Tensor]:
    def fn(t: dict[str, Tensor]) -> Tensor:
        return ops.attention(
            t["q"], t["k"], t["v"], causal=True, attn_mask=t[mask] if mask else None,
            rope=(t["cos"], t["sin"]) if rope else None,
        )  # fmt: skip

    return fn


@pytest.mark.parametrize("layout", STRIDED)
@pytest.mark.parametrize("operand", ATTENTION_OPERANDS)
def test_attention_any_strides(operand: str, layout: str) -> None:
    values = _attention_values(torch.Generator().manual_seed(len(operand) * 7 + LAYOUTS.index(layout)))
    mask = operand if operand.endswith("_mask") else "bool_mask"
    fn = _attention(mask, rope=operand in ("cos", "sin"))
    _assert_layout_invariant(fn, values, operand, layout, ("q", "k", "v"))


@pytest.mark.parametrize("layout", STRIDED)
@pytest.mark.parametrize("operand", ["q", "k", "v", "grad_out"])
def test_attention_any_strides_without_mask(operand: str, layout: str) -> None:
    """No mask, plain causal, no GQA and equal head dims: the flash CPU kernel's own causal flag, and no copy of
    k or v (GQA's repeat, the head-dim padding) between the caller's strides and the kernel."""
    values = _attention_values(torch.Generator().manual_seed(3), kv_heads=HQ, v_dim=D)
    _assert_layout_invariant(_attention(None, rope=False), values, operand, layout, ("q", "k", "v"))


def _norm_values(gen: torch.Generator) -> dict[str, Tensor]:
    shape = (2, 5, 24)
    return {
        "x": torch.randn(shape, generator=gen), "residual": torch.randn(shape, generator=gen),
        "weight": torch.randn(24, generator=gen), "bias": torch.randn(24, generator=gen),
        "grad_out": torch.randn(shape, generator=gen),
    }  # fmt: skip


def _norm(rms: bool, residual: bool) -> Callable[[dict[str, Tensor]], Tensor]:
    def fn(t: dict[str, Tensor]) -> Tensor:
        res = t["residual"] if residual else None
        out = ops.rms_norm(t["x"], t["weight"], 1e-5, res) if rms else ops.layer_norm(t["x"], t["weight"], t["bias"],
                                                                                      1e-5, res)  # fmt: skip
        if isinstance(out, tuple):  # (normed, summed): both feed the loss, so both backward paths run
            return out[0] + 0.5 * out[1]
        return out

    return fn


# (rms, residual, operand): RMSNorm alone, LayerNorm with the residual add, each operand of each
NORM_CASES = [(True, False, name) for name in ("x", "weight", "grad_out")] + [
    (False, True, name) for name in ("x", "weight", "bias", "residual", "grad_out")
]


@pytest.mark.parametrize("layout", STRIDED)
@pytest.mark.parametrize(("rms", "residual", "operand"), NORM_CASES)
def test_norms_any_strides(operand: str, layout: str, rms: bool, residual: bool) -> None:
    values = _norm_values(torch.Generator().manual_seed(LAYOUTS.index(layout)))
    grads = ("x", "weight") + (("residual",) if residual else ()) + (() if rms else ("bias",))
    _assert_layout_invariant(_norm(rms, residual), values, operand, layout, grads)


@pytest.mark.parametrize("layout", STRIDED)
@pytest.mark.parametrize("operand", ["x", "cos", "sin", "grad_out"])
def test_rope_any_strides(operand: str, layout: str) -> None:
    gen = torch.Generator().manual_seed(LAYOUTS.index(layout))
    values = {
        "x": torch.randn(B, HQ, N, D, generator=gen), "cos": torch.randn(B, 1, N, R, generator=gen),
        "sin": torch.randn(B, 1, N, R, generator=gen), "grad_out": torch.randn(B, HQ, N, D, generator=gen),
    }  # fmt: skip

    def fn(t: dict[str, Tensor]) -> Tensor:
        return ops.apply_rope(t["x"], t["cos"], t["sin"], "interleaved")

    _assert_layout_invariant(fn, values, operand, layout, ("x",))


class _TransposedKV(torch.nn.Module):
    """Keeps Kᵀ and Vᵀ ([B, H, D, N]) and hands SDPA their transposes: K and V with a non-unit last stride."""

    def forward(self, q: Tensor, kt: Tensor, vt: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, kt.transpose(-1, -2), vt.transpose(-1, -2), is_causal=True)


def test_compiled_model_with_transposed_k_and_v() -> None:
    """The compiled model's fused op used to hand these to the flash CPU kernel as they were (max diff 2.6)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q, kt, vt = torch.randn(2, 2, N, D, generator=gen), *(torch.randn(2, 2, D, N, generator=gen) for _ in range(2))
    model = _TransposedKV()
    compiled = torch.compile(model, backend="tilefuse", options={"strict": True, "inner": "eager"})
    torch.testing.assert_close(compiled(q, kt, vt), model(q, kt, vt), atol=2e-5, rtol=2e-5)


def _attention_op(q: Tensor, cos: Tensor, sin: Tensor, order: list[int] | None) -> Tensor:
    return torch.ops.tilefuse.attention(q, q, q, None, None, None, None, D**-0.5, True, False, 0, 0.0, -1, 0,
                                        out_order=order)[0]  # fmt: skip


def _rope_op(x: Tensor, cos: Tensor, sin: Tensor, order: list[int] | None) -> Tensor:
    return torch.ops.tilefuse.rope(x, cos, sin, 0, R, out_order=order)


@pytest.mark.parametrize("op", [_attention_op, _rope_op], ids=["attention", "rope"])
def test_out_order_lays_out_the_output(op: Callable[..., Tensor]) -> None:
    """`out_order` (the replaced node's layout, codegen/layouts.py) sets the output's strides, fake and real alike;
    values and gradients, for a grad in that layout or another, are those of the contiguous call."""
    from torch._subclasses import FakeTensorMode

    from tilefuse.codegen.layouts import dim_order, provably_same_layout

    order = [0, 2, 1, 3]  # [B, N, H, D] memory seen as [B, H, N, D]
    gen = torch.Generator().manual_seed(5)
    x, cos, sin = (
        torch.randn(B, HQ, N, D, generator=gen),
        torch.randn(N, R, generator=gen),
        torch.randn(N, R, generator=gen),
    )
    grad = strided(torch.randn(B, HQ, N, D, generator=gen), "transposed")
    results = []
    for out_order in (order, None):
        leaf = x.clone().requires_grad_(True)
        out = op(leaf, cos, sin, out_order)
        out.backward(grad)
        results.append((out, leaf.grad))
    (laid_out, dx), (plain, dx_plain) = results
    assert dim_order(laid_out) == order and plain.is_contiguous()
    with FakeTensorMode() as mode:
        fake = op(mode.from_tensor(x), mode.from_tensor(cos), mode.from_tensor(sin), order)
    assert provably_same_layout(fake, laid_out) and fake.stride() == laid_out.stride()
    torch.testing.assert_close(laid_out, plain, atol=0, rtol=0)
    torch.testing.assert_close(dx, dx_plain, atol=1e-6, rtol=1e-6)


def test_a_layout_is_the_same_only_when_it_is_for_every_size() -> None:
    """keep_layout (passes/out_layout.py) skips its copy on `provably_same_layout`: symbolic sizes laid out alike
    are the same layout; one that agrees only at the example sizes is not (a data-dependent size's example is 1,
    which would hide the strides of its dim)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from tilefuse.codegen.layouts import empty_in_order, provably_same_layout

    env = ShapeEnv()
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 4)
    real = torch.empty(B, N, HQ, D)
    with FakeTensorMode(shape_env=env, static_shapes=False) as mode:
        x = mode.from_tensor(real, source=ConstantSource("x"), symbolic_context=dynamic).transpose(1, 2)
        assert not all(isinstance(n, int) for n in x.shape)
        assert provably_same_layout(empty_in_order(x.shape, [0, 2, 1, 3], dtype=x.dtype, device=x.device), x)
        assert not provably_same_layout(torch.empty(x.shape), x)
        rows = env.create_unbacked_symint()
        torch._check(rows >= 0)
        assert not provably_same_layout(torch.empty(rows, 4), torch.empty_strided((rows, 4), (1, rows)))
        assert provably_same_layout(torch.empty(rows, 4), torch.empty_strided((rows, 4), (4, 1)))
