"""Every differentiable input of every fused op gets its gradient: q, k, v, a float mask, ALiBi slopes and RoPE
cos/sin of attention; x, cos and sin of RoPE; x, residual, weight and bias of the norms.

Each is checked against eager PyTorch spelling the same math, by the fp64-golden protocol (tests/gpu/_numerics.py:
err(ours) <= 3·err(eager) + floor for gradients), and in fp64 by gradcheck; the backward op is asked for the extra
gradients only when an input needs one.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _numerics import check_against_golden, eager_attention, eager_norm, eager_rope
from torch import Tensor
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

from tilefuse import ops

OPS = torch.ops.tilefuse
B, HQ, HKV, D = 2, 4, 2, 16


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _padded_mask(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> Tensor:
    """A learned-looking float bias with the last key masked out by -inf in every row (its gradient there is 0)."""
    mask = _randn(*shape, seed=seed)
    mask[..., -1] = float("-inf")
    return mask.to(dtype)


# (mask shape, slopes shape, rope table shape or None, q_len, kv_len, causal, softcap)
ATTENTION_CASES = {
    "head_bias_rope_causal": ((1, HQ, 17, 17), (HQ,), (17, D), 17, 17, True, None),
    "key_bias_partial_rope_softcap": ((B, 1, 1, 9), (B, HQ), (1, 1, 9, 8), 9, 9, False, 5.0),
    "2d_bias_bottom_right": ((7, 13), (HQ,), None, 7, 13, True, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_grads_of_every_input(case: str, dtype: torch.dtype) -> None:
    mask_shape, slopes_shape, table_shape, q_len, kv_len, causal, softcap = ATTENTION_CASES[case]
    tensors = [
        _randn(B, HQ, q_len, D, seed=1, dtype=dtype),
        _randn(B, HKV, kv_len, D, seed=2, dtype=dtype),
        _randn(B, HKV, kv_len, D, seed=3, dtype=dtype),
        _padded_mask(mask_shape, 4, dtype),
        0.1 * _randn(*slopes_shape, seed=5, dtype=dtype),
    ]
    if table_shape is not None:
        tensors += [_randn(*table_shape, seed=6, dtype=dtype), _randn(*table_shape, seed=7, dtype=dtype)]
    kwargs: dict[str, Any] = {"causal": causal, "softcap": softcap}

    def ours(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, slopes: Tensor, *rope: Tensor) -> Tensor:
        tables = (rope[0], rope[1]) if rope else None
        return ops.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes, rope=tables, **kwargs)

    def eager(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, slopes: Tensor, *rope: Tensor) -> Tensor:
        tables = (rope[0], rope[1]) if rope else None
        return eager_attention(q, k, v, attn_mask=mask, alibi_slopes=slopes, rope=tables, **kwargs)

    names = ["q", "k", "v", "mask", "alibi_slopes", "cos", "sin"][: len(tensors)]
    _, grads = check_against_golden(ours, eager, tensors, {}, (["out"], names))
    mask_grad = grads[3]
    assert mask_grad.shape == mask_shape and mask_grad.dtype == dtype
    assert torch.all(mask_grad[..., -1] == 0) and mask_grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("table_shape", [(5, 8), (1, 1, 5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_grads_of_x_cos_and_sin(layout: str, table_shape: tuple[int, ...], dtype: torch.dtype) -> None:
    tensors = [_randn(B, 3, 5, 12, seed=1, dtype=dtype), *(_randn(*table_shape, seed=s, dtype=dtype) for s in (2, 3))]

    def ours(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return ops.apply_rope(x, cos, sin, layout, 8)  # type: ignore[arg-type]

    def eager(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return eager_rope(x, cos, sin, layout, 8)

    _, grads = check_against_golden(ours, eager, tensors, {}, (["y"], ["x", "cos", "sin"]))
    assert [g.shape for g in grads] == [t.shape for t in tensors]


@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_grads_of_every_input(rms: bool, residual: bool) -> None:
    named = {"x": _randn(3, 5, 24, seed=1), "weight": _randn(24, seed=3)}
    named |= {} if rms else {"bias": _randn(24, seed=4)}
    named |= {"residual": _randn(3, 5, 24, seed=2)} if residual else {}
    eps = 1e-6 if rms else 1e-5

    def ours(*tensors: Tensor) -> Any:
        t = dict(zip(named, tensors, strict=True))
        if rms:
            return ops.rms_norm(t["x"], t["weight"], eps, residual=t.get("residual"))
        return ops.layer_norm(t["x"], t["weight"], t["bias"], eps, residual=t.get("residual"))

    def eager(*tensors: Tensor) -> Any:
        t = dict(zip(named, tensors, strict=True))
        return eager_norm(t["x"], t.get("residual"), t["weight"], t.get("bias"), eps, rms)

    outputs = ["y", "sum"] if residual else ["y"]
    check_against_golden(ours, eager, list(named.values()), {}, (outputs, list(named)))


def _f64(*shape: int, seed: int) -> Tensor:
    return _randn(*shape, seed=seed, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("layout", [0, 1])
def test_attention_gradcheck_of_mask_slopes_and_tables(layout: int) -> None:
    q, k, v = _f64(1, 2, 5, 4, seed=1), _f64(1, 1, 5, 4, seed=2), _f64(1, 1, 5, 3, seed=3)
    mask, slopes = _f64(1, 2, 5, 5, seed=4), _f64(2, seed=5)
    cos, sin = _f64(5, 4, seed=6), _f64(1, 1, 5, 4, seed=7)

    def fn(*t: Tensor) -> Tensor:
        return OPS.attention(*t, 0.3, True, True, 3, 4.0, layout, 4)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, mask, slopes, cos, sin))


def test_attention_dropout_gradcheck_of_mask() -> None:
    q, k, v, mask = _f64(1, 2, 4, 4, seed=1), _f64(1, 1, 6, 4, seed=2), _f64(1, 1, 6, 3, seed=3), _f64(4, 6, seed=4)
    rng = torch.tensor([7, 11])

    def fn(*t: Tensor) -> Tensor:
        return OPS.attention(*t, None, None, None, 0.4, False, True, 0, 0.0, -1, 0, 0.3, rng)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


@pytest.mark.parametrize("layout", [0, 1])
def test_rope_gradcheck_of_tables(layout: int) -> None:
    x, cos, sin = _f64(2, 3, 5, 6, seed=1), _f64(5, 4, seed=2), _f64(1, 1, 5, 4, seed=3)
    assert torch.autograd.gradcheck(lambda *t: OPS.rope(*t, layout, 4), (x, cos, sin))
    assert torch.autograd.gradcheck(lambda c, s: OPS.rope(x.detach(), c, s, layout, 4), (cos, sin))


class _BackwardArgs(TorchDispatchMode):
    """Records the `input_grads` argument of every tilefuse::attention_backward call."""

    def __init__(self) -> None:
        super().__init__()
        self.input_grads: list[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is OPS.attention_backward.default:
            self.input_grads.append(args[19] if len(args) > 19 else (kwargs or {}).get("input_grads"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("learned", "expected"), [(False, None), (True, [True, False, False, False])])
def test_extra_gradients_are_asked_for_only_when_needed(learned: bool, expected: list[bool] | None) -> None:
    q, k, v = (_randn(1, 2, 5, 8, seed=s).requires_grad_() for s in (1, 2, 3))
    mask = _randn(1, 2, 5, 5, seed=4).requires_grad_(learned)
    slopes = _randn(2, seed=5)
    out = ops.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes)
    with _BackwardArgs() as recorder:
        out.sum().backward()
    assert recorder.input_grads == [expected]
    assert (mask.grad is not None) == learned and slopes.grad is None


QKV = (torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 4))
EXTRAS = (torch.randn(1, 2, 5, 5), torch.randn(2), torch.randn(5, 8), torch.randn(5, 8))
DOUT, LSE = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5)


@pytest.mark.parametrize("input_grads", [[True, True, True, True], [False, True, False, True]])
def test_opcheck_backward_with_extra_gradients(input_grads: list[bool]) -> None:
    args = (DOUT, *QKV, *EXTRAS, DOUT, LSE, 0.3, True, True, 0, 2.0, 1, 8, 0.0, None, input_grads)
    opcheck(OPS.attention_backward.default, args)
    grads = OPS.attention_backward(*args)
    for grad, extra, want in zip(grads[3:], EXTRAS, input_grads, strict=True):
        assert grad.shape == (extra.shape if want else (0,))
