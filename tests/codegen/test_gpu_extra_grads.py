"""codegen/gpu.py's attention backward when a mask, ALiBi slopes or RoPE tables need a gradient (CPU tensors under
the Triton interpreter): the reference computes every gradient, told once; otherwise the Triton kernels run."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import logging

import pytest
import torch

pytest.importorskip("triton")

import tilefuse  # noqa: F401
from tilefuse.codegen import custom_ops, gpu
from tilefuse.codegen import reference as ref
from tilefuse.codegen.op_schema import ATTENTION_BACKWARD

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")


def _case() -> tuple[ref.AttnInputs, ref.AttnFlags, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 17, 16, generator=gen) for h in (4, 2, 2))
    mask, slopes = torch.randn(1, 4, 17, 17, generator=gen), torch.rand(4, generator=gen)
    inputs = ref.AttnInputs(q, k, v, mask, slopes)
    return inputs, ref.AttnFlags(0.25, True, True), torch.randn(1, 4, 17, 16, generator=gen)


def test_extra_gradients_run_the_reference_and_say_so_once(caplog: pytest.LogCaptureFixture) -> None:
    inputs, flags, grad = _case()
    out, lse = gpu.attention_with_lse(inputs, flags)
    gpu._TOLD_REFERENCE_GRADS.clear()
    wanted = (True, True, False, False)
    with caplog.at_level(logging.INFO, logger="tilefuse.codegen"):
        first = gpu.attention_grads(grad, inputs, flags, out, lse, wanted)
        gpu.attention_grads(grad, inputs, flags, out, lse, wanted)
    told = [r.getMessage() for r in caplog.records if "requires grad" in r.getMessage()]
    assert len(told) == 1 and "mask and alibi_slopes" in told[0]
    for got, want in zip(first, ref.attention_grads(grad, inputs, flags, wanted), strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_extra_gradients_the_kernels_run(caplog: pytest.LogCaptureFixture) -> None:
    inputs, flags, grad = _case()
    out, lse = gpu.attention_with_lse(inputs, flags)
    with caplog.at_level(logging.DEBUG, logger="tilefuse.codegen"):
        grads = gpu.attention_grads(grad, inputs, flags, out, lse, ref.NO_EXTRA_GRADS)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert grads[3:] == (None,) * 5  # mask, alibi_slopes, cos, sin: not asked for; rng has no gradient
    for got, want in zip(grads[:3], ref.attention_backward(grad, inputs, flags), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cuda_backward_kernel_returns_seven_outputs() -> None:
    """The op's CUDA implementation (as cuda_kernels registers it; here on CPU tensors) returns what its fake
    kernel promises."""
    inputs, flags, grad = _case()
    out, lse = gpu.attention_with_lse(inputs, flags)
    backward_cuda = custom_ops.attention_backward_impl(gpu.attention_grads)
    wanted = [True, False, False, False]
    args = ATTENTION_BACKWARD.call_args(inputs, flags, grad_out=grad, out=out, lse=lse, input_grads=wanted)
    grads = backward_cuda(*args)
    assert [tuple(g.shape) for g in grads] == [(1, 4, 17, 16), (1, 2, 17, 16), (1, 2, 17, 16), (1, 4, 17, 17),
                                               (0,), (0,), (0,)]  # fmt: skip
