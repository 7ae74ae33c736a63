"""Attention with sinks (GPT-OSS) fuses: plain attention plus the rescale out · sigmoid(lse - sink), forward and
backward (the sinks' gradient included) no worse than eager against an fp64 golden; look-alikes stay unfused."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.fx as fx
from _helpers import assert_fused, fuse, reasons, tilefuse_nodes
from _numerics import check_against_golden
from torch import Tensor
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

import tilefuse
from tilefuse.compiler import backend as backend_module
from tilefuse.compiler.options import Options

B, HQ, HK, N, D = 2, 4, 2, 13, 16
WINDOW = 4
PADDED = 3  # leading key positions padded in batch 1: with causal, its first rows see no key at all


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _keep(kind: str, batch: int, n: int) -> Tensor:
    """[B, 1, N, N] kept (query, key) pairs, built from positions like HF's mask functions."""
    q_pos, k_pos = torch.arange(n).unsqueeze(-1), torch.arange(n)
    keep = k_pos <= q_pos
    if kind == "window":
        keep = keep & (q_pos - k_pos < WINDOW)
    keep = keep.expand(batch, 1, n, n)
    if kind == "left_padding":
        real = torch.ones(batch, n, dtype=torch.bool)
        real[1, :PADDED] = False
        keep = keep & real[:, None, None, :]
    return keep


def sink_attention(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, kind: str = "causal") -> Tensor:
    """GPT-OSS eager attention in our own words: the per-head sink logit is one more column of the scores, taken
    into the row max and the softmax, and cut off before the product with V."""
    keep = _keep(kind, q.shape[0], q.shape[2])
    group = q.shape[1] // k.shape[1]
    k, v = (t[:, :, None].expand(-1, -1, group, -1, -1).reshape(t.shape[0], -1, *t.shape[2:]) for t in (k, v))
    mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    scores = torch.matmul(q, k.transpose(2, 3)) * D**-0.5 + mask
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    logits = torch.cat([scores, column], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)
    return torch.matmul(probs[..., :-1].to(v.dtype), v)


def _inputs(dtype: torch.dtype, n: int = N) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, n, D, generator=gen)
    k, v = (torch.randn(B, HK, n, D, generator=gen) for _ in range(2))
    sinks = torch.randn(HQ, generator=gen) * 2
    return [t.to(dtype) for t in (q, k, v, sinks)]


def _compiled(fn: Callable[..., Tensor]) -> tuple[Callable[..., Tensor], tilefuse.TilefuseBackend]:
    backend = tilefuse.TilefuseBackend(Options(strict=True, inner="eager"))
    return torch.compile(fn, backend=backend, fullgraph=True), backend


def test_sinks_fuse_into_attention_plus_rescale() -> None:
    q, k, v, sinks = _inputs(torch.float32)
    gm, ctx = fuse(lambda *args: sink_attention(*args, kind="window"), (q, k, v, sinks))
    (spec,) = assert_fused(gm, ctx)
    assert spec.sinks and spec.causal and spec.window == WINDOW and spec.gqa_group == HQ // HK
    assert spec.to_dict()["sinks"] is True
    (call,) = tilefuse_nodes(gm, "attention")
    assert {u.args[1] for u in call.users} == {0, 1}  # out and lse are both read: lse by the rescale
    assert "aten.sigmoid.default" in {str(n.target) for n in gm.graph.nodes}
    assert "aten.cat.default" not in {str(n.target) for n in gm.graph.nodes}


def test_a_sink_column_kept_after_the_softmax_declines() -> None:
    def keeps_sink(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor) -> Tensor:
        scores = q @ k.transpose(2, 3) * 0.25
        column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        probs = torch.cat([scores, column], dim=-1).softmax(-1)
        return probs[..., 1:] @ v  # drops the first key, not the sink

    q, _, _, sinks = _inputs(torch.float32)
    gm, ctx = fuse(keeps_sink, (q, q, torch.randn(B, HQ, N + 1, D)[:, :, :N], sinks))
    assert not tilefuse_nodes(gm, "attention") and any("slice" in r for r in reasons(ctx)), reasons(ctx)


def test_sink_site_whose_probabilities_are_returned_declines() -> None:
    def returns_probs(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
        scores = q @ k.transpose(2, 3) * 0.25
        column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        probs = torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1]
        return probs @ v, probs

    q, _, _, sinks = _inputs(torch.float32)
    gm, ctx = fuse(returns_probs, (q, q, q, sinks))
    assert not tilefuse_nodes(gm, "attention") and any("outside" in r for r in reasons(ctx)), reasons(ctx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask", ["causal", "window", "left_padding"])
def test_sink_attention_numerics_against_fp64(mask: str, dtype: torch.dtype) -> None:
    """Forward and every gradient (q, k, v, sinks) within the protocol's bound, fully masked rows included."""
    compiled, backend = _compiled(sink_attention)
    out, _ = check_against_golden(compiled, sink_attention, _inputs(dtype), {"kind": mask},
                                 (["out"], ["q", "k", "v", "sinks"]))  # fmt: skip
    fused = [s for s in backend.report.by_kind("attention") if s.status == "fused"]
    assert fused and all(s.spec.sinks for s in fused), backend.report.sites
    if mask == "left_padding":  # rows with no key: the sink takes all the weight, the output is 0, no NaN
        assert out[0][1, :, :PADDED].abs().max().item() == 0.0


def test_sinks_fuse_with_dynamic_shapes() -> None:
    backend = tilefuse.TilefuseBackend(Options(strict=True, inner="eager"))
    compiled = torch.compile(sink_attention, backend=backend, dynamic=True)
    for n in (N, 21):
        q, k, v, sinks = _inputs(torch.float32, n)
        torch.testing.assert_close(compiled(q, k, v, sinks, "window"), sink_attention(q, k, v, sinks, "window"))
    attention = backend.report.by_kind("attention")
    assert attention and all(s.status == "fused" and s.spec.sinks for s in attention), attention


def _backward_graph(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., Tensor], inputs: list[Tensor]) -> fx.Graph:
    """The AOTAutograd backward graph of the compiled fn."""
    graphs: list[fx.GraphModule] = []

    def record(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def inner(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> Any:
        return aot_module_simplified(gm, list(example_inputs), fw_compiler=record, bw_compiler=record)

    monkeypatch.setattr(backend_module, "inner_compile", inner)
    compiled, _ = _compiled(fn)
    compiled(*(t.requires_grad_() for t in inputs)).sum().backward()
    return graphs[-1].graph


@pytest.mark.parametrize("sinks", [True, False])
def test_backward_takes_grad_lse_only_with_sinks(monkeypatch: pytest.MonkeyPatch, sinks: bool) -> None:
    def plain(q: Tensor, k: Tensor, v: Tensor, unused: Tensor) -> Tensor:
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        return (q @ k.transpose(2, 3) * 0.25).masked_fill(~causal, float("-inf")).softmax(-1) @ v

    q, k, v, sink = _inputs(torch.float32)
    inputs = [q, k, v, sink] if sinks else [q, q.clone(), q.clone(), sink]
    graph = _backward_graph(monkeypatch, sink_attention if sinks else plain, inputs)
    (call,) = [n for n in graph.nodes if n.target is torch.ops.tilefuse.attention_backward.default]
    grad_lse = call.kwargs.get("grad_lse", call.args[20] if len(call.args) > 20 else None)
    assert (grad_lse is not None) == sinks, call.format_node()


def _tiny_gpt_oss() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
    )  # fmt: skip
    model = transformers.GptOssForCausalLM._from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random sinks: zeros would hide a mistake in their gradient
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_()
    return model


class _Loss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids, use_cache=False).logits


def test_hf_gpt_oss_fuses_every_attention_and_trains_like_eager() -> None:
    model = _tiny_gpt_oss()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    wrapped = _Loss(model)
    compiled, backend = _compiled(wrapped)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), wrapped(ids), atol=2e-5, rtol=2e-5)
    attention = backend.report.by_kind("attention")
    fused = [s for s in attention if s.status == "fused"]
    assert len(fused) == 2 and all(s.spec.sinks for s in fused), attention
    assert {s.spec.window for s in fused} == {8, None}  # GPT-OSS alternates sliding and full attention

    model.train()
    grads = []
    for run in (compiled, wrapped):
        model.zero_grad()
        logits = run(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    ours, eager = grads
    assert ours.keys() == eager.keys() and any(name.endswith("sinks") for name in ours)
    for name, grad in eager.items():
        torch.testing.assert_close(ours[name], grad, atol=2e-5, rtol=1e-4, msg=name)
    assert sum(1 for s in backend.report.by_kind("attention") if s.status == "fused") == 4  # and in training
