"""The tilefuse:: ops against an fp64 golden (2x eager's error forward, 3x backward), gradcheck and opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import tilefuse  # noqa: F401  (registers the ops)

ops = torch.ops.tilefuse


def _attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "q_len", "kv_len", "head_dim"), [(4, 4, 17, 17, 40), (4, 2, 1, 113, 16), (2, 1, 33, 33, 59)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_golden(
    dtype: torch.dtype, heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, q_len, head_dim, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(2, kv_heads, kv_len, head_dim, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(2, kv_heads, kv_len, head_dim, generator=gen).to(dtype).requires_grad_()
    scale = head_dim**-0.5
    gold_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    # SDPA's is_causal is top-left aligned, so compare with that alignment.
    golden = _attention_eager(*gold_in, causal)
    eager = _attention_eager(q, k, v, causal)
    ours, _ = ops.attention(q, k, v, None, None, None, None, scale, causal, False, 0, 0.0, -1, 0)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert _err(ours, golden) <= 2 * _err(eager, golden) + floor
    grad = torch.randn_like(golden, dtype=torch.float64)
    g_gold = torch.autograd.grad(golden, gold_in, grad)
    g_eager = torch.autograd.grad(eager, (q, k, v), grad.to(dtype))
    g_ours = torch.autograd.grad(ours, (q, k, v), grad.to(dtype))
    for a, b, c in zip(g_ours, g_eager, g_gold, strict=True):
        assert torch.isfinite(a).all()
        assert _err(a, c) <= 3 * _err(b, c) + floor


def test_fully_masked_rows_are_zero_with_zero_grad() -> None:
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1, :] = False
    out, lse = ops.attention(q, k, v, mask, None, None, None, 0.35, False, False, 0, 0.0, -1, 0)
    assert (lse[:, :, 1] == float("-inf")).all() and torch.isfinite(lse[:, :, [0, 2, 3]]).all()
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))


def test_fp16_large_inputs_stay_finite() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (5 * torch.randn(1, 2, 64, 64, generator=gen).half() for _ in range(3))
    out, _ = ops.attention(q, k, v, None, None, None, None, 0.125, True, True, 0, 0.0, -1, 0)
    assert torch.isfinite(out).all()


def _f64(*shape: int) -> torch.Tensor:
    return torch.randn(
        *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape))
    ).requires_grad_()


def test_attention_gradcheck_all_features() -> None:
    q, k, v = _f64(1, 4, 7, 12), _f64(1, 2, 9, 12), _f64(1, 2, 9, 6)
    cos, sin = _f64(9, 8).detach(), _f64(9, 8).detach()
    mask = torch.randn(1, 1, 7, 9, dtype=torch.float64)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, ks = cos, sin
        q_rot = torch.cat((q, q.new_zeros(1, 4, 2, 12)), dim=2)  # pad q to 9 positions so cos/sin broadcast
        out = ops.attention(
            q_rot,
            k,
            v,
            F.pad(mask, (0, 0, 0, 2)),
            torch.tensor([0.5, 0.25, 0.1, 0.05], dtype=torch.float64),
            kc,
            ks,
            0.3,
            True,
            True,
            6,
            4.0,
            0,
            8,
        )[0]
        return out[:, :, :7]

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_attention_dropout_gradcheck_and_lse_is_differentiable() -> None:
    """A fixed rng makes dropout a fixed mask: the op is then an ordinary differentiable function."""
    q, k, v = _f64(1, 4, 6, 8), _f64(1, 2, 9, 8), _f64(1, 2, 9, 5)
    rng = torch.tensor([7, 11])

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ops.attention(q, k, v, None, None, None, None, 0.4, True, True, 0, 0.0, -1, 0, 0.3, rng)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))
    out, lse = ops.attention(q, k, v, None, None, None, None, 0.4, False, False, 0, 0.0, -1, 0)
    assert out.requires_grad and lse.requires_grad and lse.dtype == torch.float32  # attention sinks read lse

    # lse is fp32 whatever the inputs (too coarse for gradcheck's finite differences): compare with autograd of the
    # fp64 logsumexp of the same scores (GQA: each k head serves two q heads)
    (dq, dk) = torch.autograd.grad(lse.sum(), (q, k))
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.4
    dq_ref, dk_ref = torch.autograd.grad(torch.logsumexp(scores, dim=-1).sum(), (q, k))
    torch.testing.assert_close(dq, dq_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dk, dk_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [0, 1])
def test_rope_gradcheck(layout: int) -> None:
    x = _f64(2, 3, 5, 12)
    cos, sin = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.rope(t, cos, sin, layout, 8), (x,))


def test_norm_gradchecks() -> None:
    x, r, w, b = _f64(3, 5, 12), _f64(3, 5, 11 + 1), _f64(12), _f64(12)
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, 1e-6, 1.0), (x, w))
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, r, w: ops.add_rms_norm(x, r, w, 1e-6, 0.0), (x, r, w))
    assert torch.autograd.gradcheck(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, 1e-5), (x, r, w, b))
    assert torch.autograd.gradcheck(lambda x: ops.layer_norm(x, None, None, 1e-5), (x,))


QKV = (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 4))
DOUT, LSE = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5)  # grad_out (and out), lse
FLAGS = (0.3, True, True, 0, 0.0, -1, 0)  # scale, causal, bottom_right, window, softcap, rope_layout, rotary_dim
DROPOUT = (0.25, torch.tensor([3, 0]))  # dropout_p, rng [seed, offset]


@pytest.mark.parametrize(
    ("op", "args"),
    [
        (
            ops.attention.default,
            (
                torch.randn(2, 4, 5, 8),
                torch.randn(2, 2, 5, 8),
                torch.randn(2, 2, 5, 8),
                None,
                None,
                torch.randn(5, 8),
                torch.randn(5, 8),
                0.3,
                True,
                True,
                0,
                0.0,
                0,
                8,
            ),
        ),
        (ops.attention.default, (*QKV, None, None, None, None, *FLAGS, *DROPOUT)),
        (ops.attention_backward.default, (DOUT, *QKV, None, None, None, None, DOUT, LSE, *FLAGS, *DROPOUT)),
        (ops.rope.default, (torch.randn(2, 5, 8), torch.randn(5, 8), torch.randn(5, 8), 1, 8)),
        (ops.add_rms_norm.default, (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(8), 1e-6, 0.0)),
        (
            ops.add_layer_norm.default,
            (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(8), torch.randn(8), 1e-5),
        ),
        (ops.layer_norm.default, (torch.randn(3, 8), None, None, 1e-5)),
        (ops.rms_norm.default, (torch.randn(3, 8), torch.randn(8), 1e-6, 1.0)),
    ],
)
def test_opcheck(op: torch._ops.OpOverload, args: tuple[object, ...]) -> None:
    opcheck(op, args)
