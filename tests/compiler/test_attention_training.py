"""Training through the backend: AOTAutograd saves the attention's (out, lse) and its dropout rng for the
backward, which then runs one fused backward op and no second forward; dropout is seeded and one mask serves
forward and backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

import tilefuse
from tilefuse.codegen import reference as ref
from tilefuse.codegen.op_schema import RNG_HIGH
from tilefuse.compiler import backend as backend_module
from tilefuse.compiler.options import Options

P = 0.25
OPS = torch.ops.tilefuse


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def causal_dropout(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    scores = (q @ k.transpose(-2, -1) * 0.25).masked_fill(
        torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1), float("-inf")
    )
    return F.dropout(scores.softmax(-1), p=P, training=True) @ v


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)


def _inputs(n: int = 32, dv: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, n, 16, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, n, dv, generator=gen, requires_grad=True)
    return q, k, v


def _compile(fn: Callable[..., Tensor], inner: str = "eager") -> tuple[Callable[..., Tensor], Any]:
    backend = tilefuse.TilefuseBackend(Options(strict=True, inner=inner))
    return torch.compile(fn, backend=backend, fullgraph=True), backend


def _graphs(monkeypatch: pytest.MonkeyPatch) -> list[fx.GraphModule]:
    """Make the backend's inner compiler plain AOTAutograd and collect its forward and backward graphs."""
    graphs: list[fx.GraphModule] = []

    def record(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def inner(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> Any:
        return aot_module_simplified(gm, list(example_inputs), fw_compiler=record, bw_compiler=record)

    monkeypatch.setattr(backend_module, "inner_compile", inner)
    return graphs


def _calls(gm: fx.GraphModule, target: Any) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is target]


def _op_args(node: fx.Node) -> dict[str, Any]:
    """A call's arguments by schema name, defaults included (traced calls leave trailing defaults out)."""
    schema = node.target._schema  # type: ignore[union-attr]
    values = {a.name: a.default_value if a.has_default_value() else None for a in schema.arguments}
    values.update(zip(values, node.args, strict=False))
    return {**values, **node.kwargs}


def _source(node: Any) -> Any:
    """The graph value behind detach() chains (AOTAutograd detaches saved outputs)."""
    while isinstance(node, fx.Node) and node.target is torch.ops.aten.detach.default:
        node = node.args[0]
    return node


@pytest.mark.parametrize("fn", [sdpa, causal_dropout])
def test_backward_graph_reads_saved_out_lse_and_rng(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., Tensor]) -> None:
    graphs = _graphs(monkeypatch)
    compiled, _ = _compile(fn)
    q, k, v = _inputs()
    compiled(q, k, v).sum().backward()
    forward, backward = graphs
    assert len(_calls(forward, OPS.attention.default)) == 1
    assert not _calls(backward, OPS.attention.default)  # the backward does not recompute the forward
    (call,) = _calls(backward, OPS.attention_backward.default)
    args = _op_args(call)
    out, lse, rng = (_source(args[name]) for name in ("out", "lse", "rng"))
    assert out.op == "placeholder" and lse.op == "placeholder", backward.code  # saved by the forward
    assert lse.meta["val"].dtype == torch.float32 and tuple(lse.meta["val"].shape) == (2, 4, 32)
    dropout = fn is causal_dropout
    assert args["dropout_p"] == (P if dropout else 0.0)
    assert (rng.op == "placeholder") if dropout else rng is None
    assert len(_calls(forward, torch.ops.aten.randint.low)) == int(dropout)


def test_dropout_grads_equal_the_reference_for_the_drawn_rng() -> None:
    """With AOTAutograd's eager inner compiler the graph's randint is torch.randint: a manual_seed predicts it."""
    compiled, backend = _compile(causal_dropout)
    q, k, v = _inputs()
    torch.manual_seed(11)
    out = compiled(q, k, v)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert backend.report.summary()["attention"] == {"fused": 1, "declined": 0}
    torch.manual_seed(11)
    rng = torch.randint(0, RNG_HIGH, (2,), dtype=torch.int64)
    inputs = ref.AttnInputs(q.detach(), k.detach(), v.detach(), rng=rng)
    flags = ref.AttnFlags(0.25, True, False, dropout_p=P)
    torch.testing.assert_close(out, ref.attention_forward(inputs, flags), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref.attention_backward(grad, inputs, flags), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_dropout_is_seeded_and_forward_and_backward_share_the_mask(inner: str) -> None:
    """With v = I the output is the dropped probabilities D, and dV = Dᵀ·dO must use the same D."""
    compiled, _ = _compile(causal_dropout, inner)
    q, k, _ = _inputs()
    v = torch.eye(32).expand(2, 4, 32, 32).clone().requires_grad_()
    results = []
    for _ in range(2):
        torch.manual_seed(5)
        out = compiled(q, k, v)
        grad = torch.randn_like(out)
        results.append((out, grad, *torch.autograd.grad(out, (q, k, v), grad)))
    (out, grad, dq, dk, dv), again = results
    for first, second in zip(results[0], again, strict=True):
        assert torch.equal(first, second)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    torch.testing.assert_close(dv, out.detach().transpose(-1, -2) @ grad, atol=1e-5, rtol=1e-5)
    causal_kept = torch.ones(32, 32, dtype=torch.bool).tril().expand(out.shape)
    dropped = (out[causal_kept] == 0).float().mean().item()
    assert abs(dropped - P) < 0.02, dropped


def test_eval_mode_model_is_unchanged() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = torch.nn.Dropout(P)

        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return self.drop((q @ k.transpose(-2, -1) * 0.25).softmax(-1)) @ v

    block = Block().eval()
    compiled, backend = _compile(block)
    q, k, v = _inputs()
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v), atol=1e-5, rtol=1e-5)
    (site,) = backend.report.by_kind("attention")
    assert site.status == "fused" and site.spec.dropout_p == 0.0
