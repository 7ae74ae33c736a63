"""codegen/gpu.py (what CUDA tensors run), exercised on CPU tensors under the Triton interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import logging

import pytest
import torch

pytest.importorskip("triton")

import tilefuse  # noqa: F401
from tilefuse.codegen import gpu
from tilefuse.codegen import reference as ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")


def _qkv(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(1, h, 17, 16, generator=gen, dtype=dtype) for h in (4, 2, 2))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_runs_triton_kernel(causal: bool) -> None:
    q, k, v = _qkv(torch.Generator().manual_seed(0))
    inputs, flags = ref.AttnInputs(q, k, v), ref.AttnFlags(0.25, causal, True)
    torch.testing.assert_close(gpu.attention(inputs, flags), ref.attention_forward(inputs, flags), atol=1e-5, rtol=1e-5)
    grad = torch.randn(1, 4, 17, 16, generator=torch.Generator().manual_seed(9))
    for got, want in zip(
        gpu.attention_backward(grad, inputs, flags), ref.attention_backward(grad, inputs, flags), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_attention_rope_forward_in_kernel_backward_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    """RoPE runs in the forward kernel's prologue; the backward kernel has no RoPE and falls back, with a reason."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(gen)
    cos, sin = torch.randn(17, 16, generator=gen), torch.randn(17, 16, generator=gen)
    inputs, flags = ref.AttnInputs(q, k, v, None, None, cos, sin), ref.AttnFlags(0.25, True, True, 0, 0.0, 0, 16)
    with caplog.at_level(logging.DEBUG, logger="tilefuse.codegen"):
        out = gpu.attention(inputs, flags)
        assert not caplog.records
        grad = torch.randn_like(out)
        grads = gpu.attention_backward(grad, inputs, flags)
    torch.testing.assert_close(out, ref.attention_forward(inputs, flags), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref.attention_backward(grad, inputs, flags), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert any("attention_backward runs the reference" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("rms", [True, False])
def test_norm_with_residual_and_backward(rms: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    x, r, g = (torch.randn(3, 5, 24, generator=gen) for _ in range(3))
    w, b = torch.randn(24, generator=gen), None if rms else torch.randn(24, generator=gen)
    y, total = gpu.norm(x, w, b, r, 1e-5, 0.0, rms)
    assert total is not None
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(y, ref.norm_forward(x + r, w, b, 1e-5, 0.0, rms)[0], atol=1e-5, rtol=1e-5)
    dx, dw, _ = gpu.norm_backward(g, x, w, 1e-5, 0.0, rms)
    _, mean, rstd = ref.norm_forward(x, w, None, 1e-5, 0.0, rms)
    want_dx, want_dw, _ = ref.norm_backward(g, x, w, mean, rstd, 0.0, rms)
    torch.testing.assert_close(dx, want_dx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, want_dw, atol=1e-4, rtol=1e-5)


def test_rope_and_fp64_fallback() -> None:
    gen = torch.Generator().manual_seed(3)
    x, cos, sin = (
        torch.randn(2, 9, 16, generator=gen),
        torch.randn(9, 8, generator=gen),
        torch.randn(9, 8, generator=gen),
    )
    torch.testing.assert_close(gpu.rope(x, cos, sin, 1, 8), ref.rope_forward(x, cos, sin, 1, 8), atol=1e-6, rtol=1e-6)
    x64 = x.double()
    torch.testing.assert_close(gpu.rope(x64, cos, sin, 0, 8), ref.rope_forward(x64, cos, sin, 0, 8))


@pytest.mark.parametrize(
    "op", ["attention", "rope", "rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "norm_backward"]
)
def test_cuda_kernels_registered(op: str) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tilefuse::{op}", "CUDA")
