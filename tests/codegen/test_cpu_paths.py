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
    torch.testing.assert_close(_cpu(args), _ref(args), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", [0, 1])
def test_attention_cpu_rope_equals_reference(layout: int) -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v = _inputs(11, 11, 2, gen)
    cos, sin = torch.randn(11, 12, generator=gen), torch.randn(11, 12, generator=gen)
    args = (q, k, v, None, None, cos, sin, 0.3, True, True, 0, 0.0, layout, 12)
    torch.testing.assert_close(_cpu(args), _ref(args), atol=2e-6, rtol=1e-5)


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
