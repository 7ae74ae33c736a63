"""codegen/gpu.py (what CUDA tensors run), exercised on CPU tensors under the Triton interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import logging

import pytest
import torch

pytest.importorskip("triton")

import tilefuse  # noqa: F401
from tilefuse.codegen import cpu, gpu
from tilefuse.codegen import reference as ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")


def _qkv(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(1, h, 17, 16, generator=gen, dtype=dtype) for h in (4, 2, 2))


def _assert_kernels_match_reference(
    inputs: ref.AttnInputs, flags: ref.AttnFlags, caplog: pytest.LogCaptureFixture
) -> None:
    """The CUDA op's forward (out, lse), then the backward kernels fed that pair: no fallback, reference values."""
    with caplog.at_level(logging.DEBUG, logger="tilefuse.codegen"):
        out, lse = gpu.attention_with_lse(inputs, flags)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
        grads = gpu.attention_backward(grad, inputs, flags, out, lse)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    torch.testing.assert_close(out, ref.attention_forward(inputs, flags), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, cpu.attention_lse(inputs, flags), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref.attention_backward(grad, inputs, flags), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_runs_triton_kernels(causal: bool, caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = _qkv(torch.Generator().manual_seed(0))
    inputs, flags = ref.AttnInputs(q, k, v), ref.AttnFlags(0.25, causal, True)
    torch.testing.assert_close(gpu.attention(inputs, flags), ref.attention_forward(inputs, flags), atol=1e-5, rtol=1e-5)
    _assert_kernels_match_reference(inputs, flags, caplog)


def test_attention_dropout_forward_and_backward_share_the_rng(caplog: pytest.LogCaptureFixture) -> None:
    """The rng reaches both kernels, which drop what the reference drops for it."""
    q, k, v = _qkv(torch.Generator().manual_seed(5))
    rng = torch.tensor([1234, 99], dtype=torch.int64)
    inputs, flags = ref.AttnInputs(q, k, v, rng=rng), ref.AttnFlags(0.25, True, True, dropout_p=0.3)
    _assert_kernels_match_reference(inputs, flags, caplog)


def test_attention_rope_runs_in_both_kernels(caplog: pytest.LogCaptureFixture) -> None:
    """RoPE runs in the forward kernel's prologue and in the backward kernels' chain rule."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(gen)
    cos, sin = torch.randn(17, 16, generator=gen), torch.randn(17, 16, generator=gen)
    inputs, flags = ref.AttnInputs(q, k, v, None, None, cos, sin), ref.AttnFlags(0.25, True, True, 0, 0.0, 0, 16)
    _assert_kernels_match_reference(inputs, flags, caplog)


def test_attention_forward_falls_back_with_lse(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = _qkv(torch.Generator().manual_seed(4), torch.float64)  # no fp64 kernel: the reference runs
    inputs, flags = ref.AttnInputs(q, k, v), ref.AttnFlags(0.25, True, True, 0, 3.0)
    with caplog.at_level(logging.DEBUG, logger="tilefuse.codegen"):
        out, lse = gpu.attention_with_lse(inputs, flags)
    assert any("attention runs the reference" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, ref.attention_forward(inputs, flags))
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse, cpu.attention_lse(inputs, flags))


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


ATTENTION_AND_ROPE_OPS = ["attention", "attention_backward", "rope"]
NORM_OPS = ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "norm_backward"]


@pytest.mark.parametrize("op", ATTENTION_AND_ROPE_OPS + NORM_OPS)
def test_cuda_kernels_registered(op: str) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tilefuse::{op}", "CUDA")


def test_attention_launch_uses_the_config_chosen_at_compile_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config the autotune registry holds for the site's Spec reaches the FA2 launcher; without one, defaults."""
    from tilefuse.autotune import registry
    from tilefuse.codegen import attention_decode
    from tilefuse.codegen.plan import TileConfig
    from tilefuse.specs import AttentionSpec

    seen: list[dict[str, int]] = []
    real = attention_decode.attention_forward_triton

    def spy(inputs: ref.AttnInputs, flags: ref.AttnFlags, **knobs: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(knobs)
        return real(inputs, flags, **knobs)

    monkeypatch.setattr(attention_decode, "attention_forward_triton", spy)
    q, k, v = _qkv(torch.Generator().manual_seed(0))
    inputs, flags = ref.AttnInputs(q, k, v), ref.AttnFlags(0.25, causal=True)
    spec = AttentionSpec(batch=1, q_heads=4, kv_heads=2, q_len=17, kv_len=17, head_dim=16, v_head_dim=16,
                         dtype="float32", scale=0.25, causal=True, gqa_group=2)  # fmt: skip
    registry.clear()
    try:
        gpu.attention_with_lse(inputs, flags)
        registry.register(spec, TileConfig(16, 16, 2, 1), "db")
        out, _ = gpu.attention_with_lse(inputs, flags)
    finally:
        registry.clear()
    assert seen == [{}, {"block_m": 16, "block_n": 16, "num_warps": 2, "num_stages": 1}]
    torch.testing.assert_close(out, ref.attention_forward(inputs, flags), atol=1e-5, rtol=1e-5)


def test_an_explicit_launch_config_wins_over_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """tilefuse.ops.attention(config=...) scopes a TileConfig around the op; the launcher takes it."""
    from tilefuse.codegen import attention_decode, launch_configs
    from tilefuse.codegen.plan import TileConfig

    seen: list[dict[str, int]] = []
    real = attention_decode.attention_forward_triton

    def spy(inputs: ref.AttnInputs, flags: ref.AttnFlags, **knobs: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(knobs)
        return real(inputs, flags, **knobs)

    monkeypatch.setattr(attention_decode, "attention_forward_triton", spy)
    q, k, v = _qkv(torch.Generator().manual_seed(0))
    with launch_configs.launch_config(TileConfig(32, 16, 4, 2)):
        gpu.attention_with_lse(ref.AttnInputs(q, k, v), ref.AttnFlags(0.25))
    gpu.attention_with_lse(ref.AttnInputs(q, k, v), ref.AttnFlags(0.25))
    assert seen == [{"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 2}, {}]
