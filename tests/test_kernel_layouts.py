"""The Triton kernels (the CUDA launchers of codegen/gpu.py, run on CPU tensors under the interpreter) give the
reference answer whatever the strides of each operand, with no fallback to the reference.

A subset of tests/test_op_layouts.py's cases at small shapes: the interpreter is slow.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import logging

import pytest
import torch
from _layouts import strided, values_of
from torch import Tensor

pytest.importorskip("triton")

from tilefuse.codegen import cpu, gpu
from tilefuse.codegen import reference as ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")

LAYOUTS = ("transposed", "sliced", "expanded", "swapped")
B, HQ, HK, N, D, R = 2, 2, 1, 9, 16, 8


def _strided_and_plain(values: dict[str, Tensor], operand: str, layout: str) -> tuple[dict, dict]:
    plain = dict(values)
    plain[operand] = values_of(values[operand], layout)
    laid_out = dict(plain)
    laid_out[operand] = strided(values[operand], layout)
    return laid_out, plain


def _no_fallback(caplog: pytest.LogCaptureFixture) -> None:
    fallbacks = [r.getMessage() for r in caplog.records if "reference" in r.getMessage()]
    assert not fallbacks, fallbacks


# Each attention case takes over a second under the interpreter: every operand, two layouts each.
ATTENTION_CASES = [
    ("q", "transposed"), ("q", "swapped"), ("k", "sliced"), ("k", "expanded"), ("v", "transposed"),
    ("v", "swapped"), ("mask", "transposed"), ("mask", "expanded"), ("cos", "sliced"), ("cos", "transposed"),
    ("grad_out", "expanded"), ("grad_out", "transposed"), ("alibi", "sliced"), ("alibi", "expanded"),
]  # fmt: skip


@pytest.mark.parametrize(("operand", "layout"), ATTENTION_CASES)
def test_attention_kernels_any_strides(operand: str, layout: str, caplog: pytest.LogCaptureFixture) -> None:
    gen = torch.Generator().manual_seed(LAYOUTS.index(layout))
    values = {
        "q": torch.randn(B, HQ, N, D, generator=gen), "k": torch.randn(B, HK, N, D, generator=gen),
        "v": torch.randn(B, HK, N, D, generator=gen), "mask": torch.randn(B, 1, N, N, generator=gen),
        "cos": torch.randn(B, 1, N, R, generator=gen), "sin": torch.randn(B, 1, N, R, generator=gen),
        "grad_out": torch.randn(B, HQ, N, D, generator=gen), "alibi": torch.rand(B, HQ, generator=gen),
    }  # fmt: skip
    laid_out, plain = _strided_and_plain(values, operand, layout)
    rope, alibi = operand == "cos", operand == "alibi"
    flags = ref.AttnFlags(0.3, True, True, 0, 0.0, ref.ROPE_ROTATE_HALF if rope else ref.ROPE_NONE, R if rope else 0)

    def inputs(t: dict[str, Tensor]) -> ref.AttnInputs:
        return ref.AttnInputs(t["q"], t["k"], t["v"], t["mask"], t["alibi"] if alibi else None,
                              t["cos"] if rope else None, t["sin"] if rope else None)  # fmt: skip

    with caplog.at_level(logging.DEBUG, logger="tilefuse.codegen"):
        out, lse = gpu.attention_with_lse(inputs(laid_out), flags)
        grads = gpu.attention_backward(laid_out["grad_out"], inputs(laid_out), flags, out, lse)
    _no_fallback(caplog)
    torch.testing.assert_close(out, ref.attention_forward(inputs(plain), flags), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, cpu.attention_lse(inputs(plain), flags), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref.attention_backward(plain["grad_out"], inputs(plain), flags), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("operand", ["x", "weight", "bias", "residual", "grad_out"])
@pytest.mark.parametrize("rms", [True, False])
def test_norm_kernels_any_strides(operand: str, layout: str, rms: bool, caplog: pytest.LogCaptureFixture) -> None:
    gen = torch.Generator().manual_seed(LAYOUTS.index(layout))
    shape = (2, 3, 20)
    values = {
        "x": torch.randn(shape, generator=gen), "residual": torch.randn(shape, generator=gen),
        "weight": torch.randn(20, generator=gen), "bias": torch.randn(20, generator=gen),
        "grad_out": torch.randn(shape, generator=gen),
    }  # fmt: skip
    laid_out, plain = _strided_and_plain(values, operand, layout)
    bias = None if rms else "bias"
    with caplog.at_level(logging.DEBUG, logger="tilefuse.codegen"):
        t = laid_out
        y, total = gpu.norm(t["x"], t["weight"], t.get(bias or ""), t["residual"], 1e-5, 0.0, rms)
        assert total is not None
        grads = gpu.norm_backward(t["grad_out"], total, t["weight"], 1e-5, 0.0, rms)
    _no_fallback(caplog)
    p = plain
    want_total = p["x"] + p["residual"]
    want_y, mean, rstd = ref.norm_forward(want_total, p["weight"], p.get(bias or ""), 1e-5, 0.0, rms)
    torch.testing.assert_close(total, want_total)
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-5)
    want_grads = ref.norm_backward(p["grad_out"], want_total, p["weight"], mean, rstd, 0.0, rms)
    for got, want in zip(grads, want_grads, strict=True):
        assert (got is None) == (want is None)  # RMSNorm's dbias: None on both sides
        if got is not None and want is not None:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("operand", ["x", "cos", "sin"])
@pytest.mark.parametrize("rope_layout", [ref.ROPE_ROTATE_HALF, ref.ROPE_INTERLEAVED])
def test_rope_kernels_any_strides(
    operand: str, layout: str, rope_layout: int, caplog: pytest.LogCaptureFixture
) -> None:
    gen = torch.Generator().manual_seed(LAYOUTS.index(layout))
    values = {
        "x": torch.randn(B, HQ, N, D, generator=gen), "cos": torch.randn(B, 1, N, R, generator=gen),
        "sin": torch.randn(B, 1, N, R, generator=gen),
    }  # fmt: skip
    laid_out, plain = _strided_and_plain(values, operand, layout)
    t, p = laid_out, plain
    with caplog.at_level(logging.DEBUG, logger="tilefuse.codegen"):
        y = gpu.rope(t["x"], t["cos"], t["sin"], rope_layout, R)
        dx = gpu.rope_backward(t["x"], t["cos"], t["sin"], rope_layout, R, torch.float32)  # x as the upstream grad
    _no_fallback(caplog)
    torch.testing.assert_close(y, ref.rope_forward(p["x"], p["cos"], p["sin"], rope_layout, R))
    torch.testing.assert_close(dx, ref.rope_backward(p["x"], p["cos"], p["sin"], rope_layout, R, torch.float32))


@pytest.mark.parametrize(
    ("operand", "layout"),
    [("q", "transposed"), ("k", "transposed"), ("k", "sliced"), ("v", "swapped"), ("mask", "expanded"),
     ("mask", "transposed")],
)  # fmt: skip
def test_decode_kernel_any_strides(operand: str, layout: str) -> None:
    """Split-KV decode (two query rows over a longer KV) reads every operand through its strides."""
    from tilefuse.codegen.attention_decode import attention_decode_triton

    gen = torch.Generator().manual_seed(11)
    kv_len = 40
    values = {
        "q": torch.randn(B, HQ, 2, D, generator=gen), "k": torch.randn(B, HK, kv_len, D, generator=gen),
        "v": torch.randn(B, HK, kv_len, D, generator=gen), "mask": torch.randn(B, 1, 2, kv_len, generator=gen),
    }  # fmt: skip
    laid_out, plain = _strided_and_plain(values, operand, layout)
    flags = ref.AttnFlags(0.3, True, True)
    t, p = laid_out, plain
    out, lse = attention_decode_triton(ref.AttnInputs(t["q"], t["k"], t["v"], t["mask"]), flags, block_n=16)
    want_inputs = ref.AttnInputs(p["q"], p["k"], p["v"], p["mask"])
    torch.testing.assert_close(out, ref.attention_forward(want_inputs, flags), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, cpu.attention_lse(want_inputs, flags), atol=1e-5, rtol=1e-5)
