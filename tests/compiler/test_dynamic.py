"""dynamic=True and mark_dynamic: symbolic sizes and run-time scalars reach the fused ops, nothing is declined for
dynamism, recompiles stay bounded over sequence lengths, and outputs match eager."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters

from tilefuse.compiler.backend import TilefuseBackend
from tilefuse.compiler.demo_model import build_demo_model, demo_inputs
from tilefuse.compiler.options import Options
from tilefuse.compiler.presets import VOCAB, load_model
from tilefuse.specs import AttentionSpec, NormSpec

LENGTHS = (1, 7, 64, 200)
# Length 1 is specialized by Dynamo (0/1 specialization), every other length shares one dynamic graph.
MAX_GRAPHS = 2


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def _graphs() -> int:
    """Graphs Dynamo compiled since the last reset (restarts that AOTAutograd asks for are not counted)."""
    return counters["stats"]["unique_graphs"]


def _backend() -> TilefuseBackend:
    return TilefuseBackend(Options(inner="eager", strict=True))


def _assert_all_fused(backend: TilefuseBackend, kinds: tuple[str, ...]) -> None:
    summary = backend.report.summary()
    assert all(summary.get(kind, {}).get("fused", 0) > 0 for kind in kinds), summary
    declined = [(s.kind, s.reason) for s in backend.report.sites if s.status == "declined"]
    assert not declined, declined


def _run_lengths(model: nn.Module, make_inputs: Callable[[int], tuple[Any, ...]], lengths: tuple[int, ...]) -> Any:
    backend = _backend()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for n in lengths:
            inputs = make_inputs(n)
            torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-4, rtol=1e-4)
    return backend


def test_demo_model_dynamic_fuses_every_site_over_lengths() -> None:
    backend = _run_lengths(build_demo_model(layers=1), lambda n: demo_inputs(seq=n), LENGTHS)
    _assert_all_fused(backend, ("attention", "rmsnorm"))
    attention = [s.spec for s in backend.report.by_kind("attention")]
    assert all(isinstance(s, AttentionSpec) and s.causal and s.mask == "none" for s in attention), attention
    # RoPE rides inside attention as in a static compile (a `:` slice Dynamo keeps as an op is an identity)
    assert all(isinstance(s, AttentionSpec) and s.rope is not None for s in attention), attention
    assert _graphs() <= MAX_GRAPHS


def test_demo_model_mark_dynamic_compiles_once() -> None:
    model, backend = build_demo_model(layers=1), _backend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for n in (7, 64, 200):
            (ids,) = demo_inputs(seq=n)
            torch._dynamo.mark_dynamic(ids, 1)
            torch.testing.assert_close(compiled(ids), model(ids), atol=1e-4, rtol=1e-4)
    _assert_all_fused(backend, ("attention", "rmsnorm"))
    assert _graphs() == 1


def _token_ids(n: int) -> tuple[Tensor]:
    return (torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(n)),)


@pytest.mark.hf
@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_llama_dynamic_fuses_every_site(attn: str) -> None:
    pytest.importorskip("transformers")
    model, _ = load_model(f"hf:llama@{attn}", batch=1, seq=8)
    decoder = model.model.model  # HFOutput -> LlamaForCausalLM -> LlamaModel
    decoder.layers = decoder.layers[:1]  # one layer keeps the test fast; every site kind is still there
    backend = _run_lengths(model, _token_ids, (7, 64))
    _assert_all_fused(backend, ("attention", "rmsnorm", "rope"))
    norms = [s.spec for s in backend.report.sites if isinstance(s.spec, NormSpec)]
    assert all(s.eps == pytest.approx(1e-6) for s in norms), norms  # the float attribute, specialized
    assert _graphs() == 1


class HandWritten(nn.Module):
    """Eager attention scaled by 1/sqrt of the head dim read from the tensor: a SymFloat under dynamic=True."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        return torch.softmax(scores, dim=-1) @ v


class LengthScaled(nn.Module):
    """A scale that depends on the sequence length (log-n style): a run-time scalar on every call."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scores = (q @ k.transpose(-2, -1)) * (2.0 / math.sqrt(k.size(-2)))
        return torch.softmax(scores, dim=-1) @ v


def _qkv(n: int, d: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(n)
    return tuple(torch.randn(2, 4, n, d, generator=gen) for _ in range(3))  # type: ignore[return-value]


def test_hand_written_attention_with_symbolic_head_dim() -> None:
    backend = _run_lengths(HandWritten(), _qkv, LENGTHS)
    _assert_all_fused(backend, ("attention",))
    spec = backend.report.by_kind("attention")[-1].spec
    assert isinstance(spec, AttentionSpec) and spec.head_dim == 16 and spec.scale == pytest.approx(0.25)
    assert _graphs() <= MAX_GRAPHS


def test_head_dim_is_specialized_not_assumed() -> None:
    """The kernels need a fixed head dim: a new one recompiles (a guard), never runs with the old one."""
    backend = _backend()
    compiled = torch.compile(HandWritten(), backend=backend, dynamic=True)
    with torch.no_grad():
        for d in (16, 8):
            inputs = _qkv(7, d)
            torch.testing.assert_close(compiled(*inputs), HandWritten()(*inputs), atol=1e-5, rtol=1e-5)
    assert [s.spec.head_dim for s in backend.report.by_kind("attention")] == [16, 8]  # type: ignore[union-attr]


def test_length_dependent_scale_is_a_run_time_scalar() -> None:
    """Forward and backward: the backward op receives the same run-time scale."""
    model, backend = LengthScaled(), _backend()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for n in (7, 64, 200):
        inputs = [t.requires_grad_() for t in _qkv(n)]
        grads = torch.autograd.grad(compiled(*inputs).square().sum(), inputs)
        expected = torch.autograd.grad(model(*inputs).square().sum(), inputs)
        torch.testing.assert_close(grads, expected, atol=1e-4, rtol=1e-4)
    _assert_all_fused(backend, ("attention",))
    (site,) = backend.report.by_kind("attention")
    assert isinstance(site.spec, AttentionSpec) and site.spec.dynamic_scalars == ("scale",)
    assert _graphs() == 1  # the scale changes with every length, the graph does not


class Sdpa(nn.Module):
    """SDPA with an explicit scale, optionally under a causal boolean tril mask (which the pass proves causal)."""

    def __init__(self, scale: float, causal: bool) -> None:
        super().__init__()
        self.scale, self.causal = scale, causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n = q.size(-2)
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril() if self.causal else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


# torch's flash CPU kernel returns NaN for is_causal with a scale <= 0; codegen/cpu.py sends such proven-causal
# sites to the reference (scale 0 and -0.5 with causal below).
@pytest.mark.parametrize(
    ("scale", "causal"),
    [(0.0, False), (-0.5, False), (1e-6, True), (-3.0, False), (-0.5, True), (0.0, True)],
)
@pytest.mark.parametrize("dynamic", [False, True])
def test_sdpa_scale_edge_values_match_eager(scale: float, causal: bool, dynamic: bool) -> None:
    model, backend = Sdpa(scale, causal), _backend()
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch.no_grad():
        for n in (7, 33):
            inputs = _qkv(n)
            torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    _assert_all_fused(backend, ("attention",))
    assert {s.spec.scale for s in backend.report.by_kind("attention")} == {scale}  # type: ignore[union-attr]
