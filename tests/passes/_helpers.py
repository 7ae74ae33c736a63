"""Shared helpers for the pass tests: run a pass on a captured module, inspect the result, build tiny HF models."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.fx as fx

from tilefuse.compiler.capture import capture
from tilefuse.passes.attention import AttentionPass
from tilefuse.passes.base import PassContext, PassResult
from tilefuse.passes.canonicalize import CanonicalizePass
from tilefuse.passes.manager import PassManager, check_graph
from tilefuse.specs import AttentionSpec

GraphPassFn = Callable[[fx.GraphModule, PassContext], PassResult]


def run_pass(
    graph_pass: GraphPassFn, fn: Callable[..., Any], inputs: Sequence[Any], ctx: PassContext | None = None
) -> tuple[fx.GraphModule, PassContext]:
    """Capture `fn(*inputs)`, run `graph_pass` on it (through a PassManager, which tidies the graph after a pass),
    and check the graph invariants."""
    gm = capture(fn, inputs)
    ctx = ctx if ctx is not None else PassContext()
    manager = graph_pass if isinstance(graph_pass, PassManager) else PassManager([graph_pass])
    result = manager(gm, ctx)
    check_graph(result.graph_module)
    return result.graph_module, ctx


def ops_in(gm: fx.GraphModule) -> set[str]:
    """Qualified names ('aten.rsqrt', 'tilefuse.rms_norm', ...) of every op the graph calls."""
    return {
        node.target._schema.name.replace("::", ".")
        for node in gm.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
    }


def tilefuse_nodes(gm: fx.GraphModule, op: str) -> list[fx.Node]:
    target = getattr(torch.ops.tilefuse, op).default
    return [n for n in gm.graph.nodes if n.target is target]


def sites(ctx: PassContext, kind: str, status: str) -> list[Any]:
    return [s for s in ctx.sites if s.kind == kind and s.status == status]


def reasons(ctx: PassContext) -> list[str]:
    return [s.reason or "" for s in ctx.sites if s.status == "declined"]


# ------------------------------------------------------------------------------------------------ attention
PIPELINE = PassManager([CanonicalizePass(), AttentionPass()])
SOFTMAX_OPS = {"aten.softmax", "aten._softmax", "aten._safe_softmax"}


def fuse(module: Callable[..., Any], inputs: Sequence[Any]) -> tuple[fx.GraphModule, PassContext]:
    """Canonicalize and fuse attention in `module(*inputs)`."""
    return run_pass(PIPELINE, module, inputs)


def assert_fused(gm: fx.GraphModule, ctx: PassContext, count: int = 1) -> list[AttentionSpec]:
    """Every attention site fused (`count` of them), and no softmax or SDPA left in the graph."""
    assert ctx.counters["attention_fused"] == count and not ctx.counters["attention_declined"], ctx.sites
    assert len(tilefuse_nodes(gm, "attention")) == count, gm.code
    assert not ops_in(gm) & (SOFTMAX_OPS | {"aten.scaled_dot_product_attention"}), gm.code
    return [s.spec for s in sites(ctx, "attention", "fused")]


def assert_same(actual: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Structural allclose over tensors and tuples of tensors."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e, atol, rtol)
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def assert_no_worse_than_eager(ours: torch.Tensor, eager: torch.Tensor, golden: torch.Tensor, floor: float) -> None:
    """err(ours) <= 2 * err(eager) + floor, errors measured against an fp64 golden."""
    err_ours = (ours.double() - golden).abs().max().item()
    err_eager = (eager.double() - golden).abs().max().item()
    assert err_ours <= 2 * err_eager + floor, (err_ours, err_eager)


def as_double(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


# --------------------------------------------------------------------------------------- Hugging Face models
class FirstOutput(torch.nn.Module):
    """The first output (logits or last hidden state) of an HF model, called without a KV cache."""

    def __init__(self, model: torch.nn.Module, use_cache: bool = True) -> None:
        super().__init__()
        self.model = model
        self.use_cache = use_cache

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if self.use_cache else {}
        return self.model(ids, **kwargs)[0]


@functools.cache
def hf_model(name: str) -> FirstOutput:
    """A tiny, seeded, eval-mode HF model with eager attention (built once per test session)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    configs: dict[str, tuple[Any, Any]] = {
        "llama": (transformers.LlamaConfig(**common, num_key_value_heads=2), transformers.LlamaForCausalLM),
        "gemma": (
            transformers.GemmaConfig(**common, num_key_value_heads=2, head_dim=16),
            transformers.GemmaForCausalLM,
        ),
        "gptj": (
            transformers.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=32),
            transformers.GPTJForCausalLM,
        ),
        "neox": (transformers.GPTNeoXConfig(**common, rotary_pct=0.5), transformers.GPTNeoXForCausalLM),
        "phi": (transformers.PhiConfig(**common, partial_rotary_factor=0.5), transformers.PhiForCausalLM),
        "gpt2": (
            transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32),
            transformers.GPT2LMHeadModel,
        ),
        "bert": (transformers.BertConfig(**common, max_position_embeddings=32), transformers.BertModel),
        "t5": (
            transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
            transformers.T5EncoderModel,
        ),
    }
    config, cls = configs[name]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return FirstOutput(cls(config).eval(), use_cache=name not in ("bert", "t5"))


def hf_inputs() -> torch.Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
