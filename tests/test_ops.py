"""The functional API tilefuse.ops: argument checks, semantics against plain torch, autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilefuse import ops


def _qkv(heads: int = 4, kv_heads: int = 2, n: int = 9, d: int = 16) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, h, n, d, generator=gen, requires_grad=True) for h in (heads, kv_heads, kv_heads))


def test_attention_matches_sdpa_with_gqa_and_grads() -> None:
    q, k, v = _qkv()
    out = ops.attention(q, k, v, causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    for got, exp in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_attention_rope_equals_rotating_first() -> None:
    q, k, v = _qkv(4, 4)
    gen = torch.Generator().manual_seed(1)
    cos, sin = torch.randn(9, 16, generator=gen), torch.randn(9, 16, generator=gen)
    fused = ops.attention(q, k, v, rope=(cos, sin))
    manual = ops.attention(ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin), v)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)


def test_norms_match_torch() -> None:
    gen = torch.Generator().manual_seed(2)
    x, r, w, b = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.randn(8), torch.randn(8)
    torch.testing.assert_close(ops.layer_norm(x, w, b), F.layer_norm(x, (8,), w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w), torch.rms_norm(x, (8,), w, 1e-6), atol=1e-5, rtol=1e-5)
    normed, total = ops.rms_norm(x, w, residual=r)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(normed, torch.rms_norm(x + r, (8,), w, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"q": torch.randn(2, 4, 8)}, ValueError, "4 dims"),
        ({"k": torch.randn(2, 3, 9, 16), "v": torch.randn(2, 3, 9, 16)}, ValueError, "multiple"),
        ({"dropout_p": 0.1}, ValueError, "dropout"),
        ({"window": 0}, ValueError, "window"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"rope": (torch.randn(9, 6), torch.randn(9, 6)), "rotary_dim": 8}, ValueError, "rotary_dim"),
        ({"rope_layout": "spiral", "rope": (torch.randn(9, 16), torch.randn(9, 16))}, ValueError, "rope_layout"),
        ({"q": torch.randint(0, 3, (2, 4, 9, 16))}, ValueError, "dtype"),
        ({"attn_mask": [[True]]}, TypeError, "attn_mask"),
    ],
)
def test_attention_rejects_bad_arguments(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    q, k, v = (t.detach() for t in _qkv())
    args = {"q": q, "k": k, "v": v, **kwargs}
    with pytest.raises(error, match=message):
        ops.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)  # type: ignore[arg-type]


def test_norm_rejects_bad_arguments() -> None:
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="residual shape"):
        ops.layer_norm(x, residual=torch.randn(3, 9))
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, None, eps=0.0)
    with pytest.raises(ValueError, match="cos shape"):
        ops.apply_rope(x, torch.randn(3, 8), torch.randn(1, 8))
