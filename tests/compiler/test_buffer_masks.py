"""Masks read from module buffers (GPT-2, nanoGPT, minGPT): proven causal or banded from the buffer's values at
compile time, with a run-time guard, so a buffer changed after compiling is honoured (read as a data mask)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import tilefuse
from tilefuse.compiler.options import Options
from tilefuse.passes.buffer_masks import Band, band_from_value

N, T = 16, 12  # buffer size (block_size) and sequence length
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _scores(q: Tensor, k: Tensor) -> Tensor:
    return (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))


class NanoGPT(nn.Module):
    """nanoGPT/minGPT: a float tril buffer viewed [1, 1, n, n], sliced [:T, :T], `masked_fill(bias == 0, -inf)`."""

    def __init__(self, buffer: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(N, N)).view(1, 1, N, N) if buffer is None else buffer)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        t = q.size(-2)
        att = _scores(q, k).masked_fill(self.bias[:, :, :t, :t] == 0, NEG_INF)
        return att.softmax(-1) @ v


class GPT2(nn.Module):
    """GPT-2 (transformers before 4.4x): a bool tril buffer sliced to the last nq rows, `where(keep, w, min)`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(N, N, dtype=torch.bool)).view(1, 1, N, N))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        nq, nk = q.size(-2), k.size(-2)
        keep = self.bias[:, :, nk - nq : nk, :nk]
        att = torch.where(keep, _scores(q, k), torch.finfo(q.dtype).min)
        return att.softmax(-1) @ v


def _band(window: int) -> Tensor:
    ones = torch.ones(N, N)
    return (torch.tril(ones) * torch.triu(ones, 1 - window)).view(1, 1, N, N)


def _qkv(nq: int = T, nk: int = T, requires_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, nq, 8, generator=gen)
    k, v = (torch.randn(2, 4, nk, 8, generator=gen) for _ in range(2))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))  # type: ignore[return-value]


def _compile(model: nn.Module) -> tuple[Callable[..., Tensor], tilefuse.TilefuseBackend]:
    backend = tilefuse.TilefuseBackend(Options(strict=True, inner="eager"))
    return torch.compile(model, backend=backend), backend


def _site(backend: tilefuse.TilefuseBackend) -> tuple[bool, int | None, str]:
    (site,) = backend.report.sites
    assert site.status == "fused", site.reason
    return site.spec.causal, site.spec.window, site.spec.mask


def _changed_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "changed since a mask was proven" in r.getMessage()]


# ------------------------------------------------------------------------------------------------ the proof
@pytest.mark.parametrize(
    ("value", "band"),
    [
        (torch.tril(torch.ones(5, 5)), Band(None, 0)),
        (torch.tril(torch.ones(5, 7), 2).bool(), Band(None, 2)),
        (torch.triu(torch.ones(5, 5), -1) * torch.tril(torch.ones(5, 5)), Band(-1, 0)),
        (torch.tril(torch.ones(5, 5)).expand(3, 2, 5, 5), Band(None, 0)),
        (torch.ones(4, 4), Band(None, None)),
        (torch.eye(4), Band(0, 0)),
    ],
)
def test_band_from_value(value: Tensor, band: Band) -> None:
    assert band_from_value(value) == band


@pytest.mark.parametrize(
    "value",
    [
        torch.zeros(4, 4),  # nothing kept: a data mask with every row masked
        torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),  # a hole inside the band
        torch.stack([torch.tril(torch.ones(4, 4)), torch.ones(4, 4)]),  # differs between leading indices
    ],
)
def test_non_band_values_are_not_proven(value: Tensor) -> None:
    assert band_from_value(value) is None


# ------------------------------------------------------------------------------------------- through torch.compile
@pytest.mark.parametrize(
    ("factory", "causal", "window"),
    [(NanoGPT, True, None), (GPT2, True, None), (lambda: NanoGPT(_band(4)), True, 4)],
    ids=["nanogpt", "gpt2", "banded"],
)
def test_buffer_mask_is_proven_from_its_values(factory: Callable[[], nn.Module], causal: bool, window: int) -> None:
    model = factory()
    compiled, backend = _compile(model)
    inputs = _qkv()
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    assert _site(backend) == (causal, window, "none")  # no N×N data mask left


def test_fewer_queries_than_keys_align_bottom_right() -> None:
    model = GPT2()
    compiled, backend = _compile(model)
    inputs = _qkv(nq=4, nk=T)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    assert _site(backend) == (True, None, "none") and backend.report.sites[0].spec.align == "bottom_right"


def test_in_place_change_is_honoured(caplog: pytest.LogCaptureFixture) -> None:
    model = NanoGPT()
    compiled, backend = _compile(model)
    inputs = _qkv()
    with caplog.at_level(logging.WARNING, logger="tilefuse"):
        causal_out = compiled(*inputs)
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
        assert not _changed_warnings(caplog)  # an unchanged buffer keeps the proven path
        model.bias.fill_(1.0)  # now attends to every key
        expected = model(*inputs)
        assert not torch.allclose(expected, causal_out, atol=1e-3)
        torch.testing.assert_close(compiled(*inputs), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled(*inputs), expected, atol=1e-5, rtol=1e-5)
    assert len(_changed_warnings(caplog)) == 1 and "bias" in _changed_warnings(caplog)[0]
    assert _site(backend)[0]


def test_replaced_buffer_is_honoured() -> None:
    model = GPT2()
    compiled, _ = _compile(model)
    inputs = _qkv()
    causal_out = compiled(*inputs)
    model.bias = torch.triu(torch.ones(N, N, dtype=torch.bool)).view(1, 1, N, N)  # the future only
    expected = model(*inputs)
    assert not torch.allclose(expected, causal_out, atol=1e-3)
    torch.testing.assert_close(compiled(*inputs), expected, atol=1e-5, rtol=1e-5)


def _dynamic_qkv(t: int) -> tuple[Tensor, Tensor, Tensor]:
    inputs = _qkv(t, t)
    for x in inputs:
        torch._dynamo.mark_dynamic(x, 2)
    return inputs


def test_symbolic_sequence_length_proven_and_honoured() -> None:
    model = NanoGPT()
    compiled, backend = _compile(model)
    for t in (5, 9):
        inputs = _dynamic_qkv(t)
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    assert [_site(backend)] == [(True, None, "none")]  # one graph, for every length
    model.bias.copy_(_band(2))
    for t in (7, 3):
        inputs = _dynamic_qkv(t)
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)


def test_training_gradients_match_eager() -> None:
    model = NanoGPT()
    compiled, backend = _compile(model)
    ours, eager = _qkv(requires_grad=True), _qkv(requires_grad=True)
    compiled(*ours).square().sum().backward()
    model(*eager).square().sum().backward()
    for a, b in zip(ours, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    assert _site(backend) == (True, None, "none")


def test_a_mask_passed_as_an_argument_stays_data() -> None:
    """Only module state is read at compile time: an argument may hold other values on the next call."""

    def attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
        return _scores(q, k).masked_fill(keep == 0, NEG_INF).softmax(-1) @ v

    compiled, backend = _compile(attend)  # type: ignore[arg-type]
    inputs = (*_qkv(), torch.tril(torch.ones(T, T)))
    torch.testing.assert_close(compiled(*inputs), attend(*inputs), atol=1e-5, rtol=1e-5)
    assert _site(backend) == (False, None, "boolean")


def test_non_band_buffer_stays_data() -> None:
    keep = (torch.rand(N, N, generator=torch.Generator().manual_seed(0)) > 0.3) | torch.eye(N, dtype=torch.bool)
    model = NanoGPT(keep.float().view(1, 1, N, N))
    compiled, backend = _compile(model)
    inputs = _qkv()
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    assert _site(backend) == (False, None, "boolean")
