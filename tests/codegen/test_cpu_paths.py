"""codegen/cpu.py computes the same function as codegen/reference.py (it only picks faster torch kernels)."""

from __future__ import annotations

import pytest
import torch

from tilefuse.codegen import cpu
from tilefuse.codegen import reference as ref


def _inputs(q_len: int, kv_len: int, group: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    q = torch.randn(2, 2 * group, q_len, 16, generator=gen)
    k = torch.randn(2, 2, kv_len, 16, generator=gen)
    v = torch.randn(2, 2, kv_len, 8, generator=gen)
    return q, k, v


def _cpu(args: tuple[object, ...]) -> torch.Tensor:
    return cpu.attention(ref.AttnInputs(*args[:7]), ref.AttnFlags(*args[7:]))  # type: ignore[arg-type]


def _ref(args: tuple[object, ...]) -> torch.Tensor:
    return ref.attention_forward(ref.AttnInputs(*args[:7]), ref.AttnFlags(*args[7:]))  # type: ignore[arg-type]


def _with_lse(args: tuple[object, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu.attention_with_lse(ref.AttnInputs(*args[:7]), ref.AttnFlags(*args[7:]))  # type: ignore[arg-type]


def _lse(args: tuple[object, ...]) -> torch.Tensor:
    return cpu.attention_lse(ref.AttnInputs(*args[:7]), ref.AttnFlags(*args[7:]))  # type: ignore[arg-type]


MASKS = ["none", "bool_padding", "bool_full", "additive"]


def _mask(kind: str, q_len: int, kv_len: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "bool_padding":
        keep = torch.ones(2, 1, 1, kv_len, dtype=torch.bool)
        keep[1, ..., kv_len // 2 :] = False
        return keep
    if kind == "bool_full":
        keep = torch.rand(2, 1, q_len, kv_len, generator=gen) > 0.3
        keep[0, 0, 0] = False  # one fully masked row
        return keep
    if kind == "additive":
        return torch.randn(1, 1, q_len, kv_len, generator=gen)
    return None


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize(("q_len", "kv_len"), [(17, 17), (5, 23), (1, 9)])
@pytest.mark.parametrize(
    ("causal", "bottom_right", "window"),
    [(False, False, 0), (True, False, 0), (True, True, 0), (True, True, 4), (False, False, 3)],
)
@pytest.mark.parametrize("group", [1, 2])
def test_attention_cpu_equals_reference(
    mask_kind: str, q_len: int, kv_len: int, causal: bool, bottom_right: bool, window: int, group: int
) -> None:
    gen = torch.Generator().manual_seed(q_len * 31 + kv_len)
    q, k, v = _inputs(q_len, kv_len, group, gen)
    mask = _mask(mask_kind, q_len, kv_len, gen)
    args = (q, k, v, mask, None, None, None, 0.25, causal, bottom_right, window, 0.0, -1, 0)
    want = _ref(args)
    torch.testing.assert_close(_cpu(args), want, atol=2e-6, rtol=1e-5)
    out, lse = _with_lse(args)  # the flash CPU kernel's (out, lse) against the reference and the scores' lse
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    torch.testing.assert_close(lse, _lse(args), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", [0, 1])
def test_attention_cpu_rope_equals_reference(layout: int) -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v = _inputs(11, 11, 2, gen)
    cos, sin = torch.randn(11, 12, generator=gen), torch.randn(11, 12, generator=gen)
    args = (q, k, v, None, None, cos, sin, 0.3, True, True, 0, 0.0, layout, 12)
    torch.testing.assert_close(_cpu(args), _ref(args), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_attention_lse_equals_fp64_logsumexp(dtype: torch.dtype) -> None:
    """Softcap, ALiBi (bottom-right) and a keep-mask with one fully masked row: lse = log Σ exp(scores), or -inf."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (t.to(dtype) for t in _inputs(5, 9, 2, gen))
    keep = torch.rand(2, 1, 5, 9, generator=gen) > 0.3
    keep[1, 0, 2] = False
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    args = (q, k, v, keep, slopes, None, None, 0.3, False, True, 0, 4.0, -1, 0)
    scores = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    scores = torch.tanh(scores / 4.0) * 4.0
    rel = torch.arange(9) - (torch.arange(5).unsqueeze(-1) + 4)
    scores = (scores + slopes.double().reshape(4, 1, 1) * rel).masked_fill(~keep, float("-inf"))
    out, lse = _with_lse(args)
    torch.testing.assert_close(lse, scores.logsumexp(-1).float(), atol=1e-5, rtol=1e-5)
    assert (lse[1, :, 2] == float("-inf")).all()
    torch.testing.assert_close(out, _ref(args))


def test_attention_with_lse_head_dims_differ_and_empty() -> None:
    gen = torch.Generator().manual_seed(12)
    q, k, v = _inputs(7, 7, 2, gen)  # head dim 16, value head dim 8: the flash kernel gets padded inputs
    args = (q, k, v, None, None, None, None, 0.25, True, False, 0, 0.0, -1, 0)
    out, lse = _with_lse(args)
    torch.testing.assert_close(out, _ref(args), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, _lse(args), atol=2e-6, rtol=1e-5)
    out, lse = _with_lse((q[:, :, :0], k, v, *args[3:]))
    assert out.shape == (2, 4, 0, 8) and lse.shape == (2, 4, 0)
    out, lse = _with_lse((q, k[:, :, :0], v[:, :, :0], *args[3:]))
    assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rms", "offset", "affine"),
    [(True, 0.0, True), (True, 1.0, True), (True, 0.0, False), (False, 0.0, True), (False, 0.0, False)],
)
def test_norm_cpu_equals_reference(dtype: torch.dtype, rms: bool, offset: float, affine: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 59, generator=gen).to(dtype)
    weight = torch.randn(59, generator=gen) if affine else None
    bias = None if rms or not affine else torch.randn(59, generator=gen)
    got = cpu.norm(x, weight, bias, 1e-5, offset, rms)
    want = ref.norm_forward(x, weight, bias, 1e-5, offset, rms)[0]
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(9,), (5, 9), (2, 5, 9)])
def test_attention_cpu_low_rank_masks(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v = _inputs(5, 9, 1, gen)
    mask = torch.randn(*shape, generator=gen)
    args = (q, k, v, mask, None, None, None, 0.25, True, True, 0, 0.0, -1, 0)
    torch.testing.assert_close(_cpu(args), _ref(args), atol=2e-6, rtol=1e-5)
