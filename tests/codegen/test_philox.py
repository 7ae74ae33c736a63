"""codegen.philox equals tl.rand bit for bit (interpreter); reference dropout: keep mask, forward and backward."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch
from torch import Tensor

from tilefuse.codegen import reference as ref
from tilefuse.codegen.philox import uniform

triton = pytest.importorskip("triton", reason="triton is not installed; tl.rand cannot be compared")
tl = pytest.importorskip("triton.language")

SEEDS = [0, 12345, -7, 2**40 + 3, 2**63 - 1]
EDGE_COUNTERS = [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**45 + 17, 2**63 - 1, -1, -(2**40)]


@triton.jit
def _rand_kernel(Seed, Counters, Out, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    offs = tl.arange(0, BLOCK)
    counters = tl.load(Counters + offs, mask=offs < n)
    tl.store(Out + offs, tl.rand(tl.load(Seed), counters), mask=offs < n)


def _triton_rand(seed: int, counters: Tensor) -> Tensor:
    out = torch.empty(counters.numel(), dtype=torch.float32)
    block = triton.next_power_of_2(counters.numel())
    _rand_kernel[(1,)](torch.tensor([seed], dtype=torch.int64), counters, out, counters.numel(), BLOCK=block)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_uniform_is_bitwise_tl_rand(seed: int, dtype: torch.dtype) -> None:
    edges = EDGE_COUNTERS if dtype == torch.int64 else [2**31 - 1, -1, -(2**31)]
    counters = torch.cat((torch.arange(300), torch.tensor(edges))).to(dtype)
    assert torch.equal(uniform(seed, counters), _triton_rand(seed, counters))


def test_uniform_range_and_seed_tensor() -> None:
    counters = torch.arange(1 << 14)
    u = uniform(torch.tensor(3), counters)
    assert u.dtype == torch.float32 and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(u, uniform(3, counters)) and not torch.equal(u, uniform(4, counters))


def test_uniform_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="counters"):
        uniform(0, torch.zeros(3))
    with pytest.raises(ValueError, match="seed"):
        uniform(torch.tensor([1, 2]), torch.zeros(3, dtype=torch.int64))


def test_dropout_keep_counters_and_fraction() -> None:
    """Element (b, h, i, j) uses counter offset + flat index; the kept fraction is about 1 - p."""
    rng = torch.tensor([11, 1000], dtype=torch.int64)
    shape = (2, 3, 17, 40)
    keep = ref.dropout_keep(rng, shape, 0.3)
    counters = 1000 + torch.arange(2 * 3 * 17 * 40)
    assert keep.dtype == torch.bool and keep.shape == shape
    assert torch.equal(keep.flatten(), uniform(11, counters) >= 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    assert ref.dropout_keep(rng, shape, 0.0).all()


@pytest.mark.parametrize("bad", [{"p": 1.0}, {"p": -0.1}, {"rng": torch.tensor([1, 2, 3])}, {"rng": torch.ones(2)}])
def test_dropout_keep_rejects_bad_arguments(bad: dict[str, object]) -> None:
    args: dict[str, object] = {"rng": torch.tensor([1, 2]), "p": 0.5} | bad
    with pytest.raises(ValueError):
        ref.dropout_keep(args["rng"], (1, 1, 2, 2), args["p"])  # type: ignore[arg-type]


def _inputs(rng: Tensor | None) -> ref.AttnInputs:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    return ref.AttnInputs(q, k[:, :2], v[:, :2], rng=rng)


def test_reference_dropout_forward_and_p0() -> None:
    rng = torch.tensor([5, 77], dtype=torch.int64)
    inputs, flags = _inputs(rng), ref.AttnFlags(scale=0.3, causal=True, dropout_p=0.25)
    probs, _ = ref.attention_probs(inputs, ref.AttnFlags(scale=0.3, causal=True))
    keep = ref.dropout_keep(rng, tuple(probs.shape), 0.25)  # type: ignore[arg-type]
    v_full = inputs.v.repeat_interleave(2, dim=1)
    expected = (probs * keep / 0.75) @ v_full
    torch.testing.assert_close(ref.attention_forward(inputs, flags), expected)
    no_dropout = ref.attention_forward(inputs, flags._replace(dropout_p=0.0))
    assert torch.equal(no_dropout, ref.attention_forward(_inputs(None), flags._replace(dropout_p=0.0)))
    with pytest.raises(ValueError, match="rng"):
        ref.attention_forward(_inputs(None), flags)


def test_reference_dropout_backward_matches_autograd() -> None:
    inputs = _inputs(torch.tensor([5, 77], dtype=torch.int64))
    flags = ref.AttnFlags(scale=0.3, causal=True, softcap=0.9, dropout_p=0.4)
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    out = ref.attention_forward(inputs._replace(q=leaves[0], k=leaves[1], v=leaves[2]), flags)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, grad_out)
    for mine, gold in zip(ref.attention_backward(grad_out, inputs, flags), expected, strict=True):
        torch.testing.assert_close(mine, gold)
