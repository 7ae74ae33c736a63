"""Fusion per user workflow: how many sites each real workflow fuses, whether the fused ops run, whether it is right.

Issue 15's matrix, measured on CPU: training with activation checkpointing (HF and torch.utils.checkpoint),
`dynamic=True` over several lengths, PyTorch's encoder fast path, registered causal buffers, learned attention
biases, RoPE and mask spellings of DeepSeek-V3, GPT-OSS, MPT and T5, and operand edge cases (strided V, scale=0,
per-batch masks). For each: sites fused / found (from the fusion report), tilefuse ops that actually executed
(torch.profiler), the largest output and gradient difference from eager, and any error.

    python -m tilefuse.benchmarks.workflows [--only NAME ...] [--out benchmarks/results/cpu/workflows.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tilefuse.benchmarks.harness import executed_ops, grad_diff
from tilefuse.compiler.backend import TilefuseBackend
from tilefuse.compiler.options import Options
from tilefuse.compiler.presets import load_model

Row = dict[str, Any]


def _backend(**options: Any) -> TilefuseBackend:
    options.setdefault("inner", "eager")
    return TilefuseBackend(Options.from_any(None, **options))


def _fused(backend: TilefuseBackend) -> dict[str, str]:
    """{kind: "fused/found"} over every site of the backend's report."""
    totals: Counter[str] = Counter()
    fused: Counter[str] = Counter()
    for site in backend.report.sites:
        totals[site.kind] += 1
        fused[site.kind] += site.status == "fused"
    out = {kind: f"{fused[kind]}/{totals[kind]}" for kind in sorted(totals)}
    specs = [s.spec for s in backend.report.sites if s.kind == "attention" and s.status == "fused"]
    if specs:  # how each fused attention site carries its mask and RoPE
        out["attention_causal"] = str(sum(bool(getattr(s, "causal", False)) for s in specs))
        out["attention_data_mask"] = str(sum(getattr(s, "mask", "none") != "none" for s in specs))
        out["attention_with_rope"] = str(sum(getattr(s, "rope", None) is not None for s in specs))
    return out


def _max_diff(a: Any, b: Any) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _twin(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _train_step(model: Callable[..., Any], inputs: tuple[Any, ...]) -> Tensor:
    out = model(*inputs)
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach()


def _training_row(model: nn.Module, inputs: tuple[Any, ...], **options: Any) -> Row:
    torch._dynamo.reset()
    eager, compiled_model = model, _twin(model)
    backend = _backend(**options)
    compiled = torch.compile(compiled_model, backend=backend)
    loss_eager = _train_step(eager, inputs)
    loss = _train_step(compiled, inputs)  # compiles: profiled below on a second step
    worst_grad_diff, _ = grad_diff(compiled_model, eager)
    _, ops = executed_ops(lambda: _train_step(compiled, inputs))
    return {
        "fused": _fused(backend),
        "executed": dict(ops),
        "out_diff": _max_diff(loss, loss_eager),
        "grad_diff": worst_grad_diff,
        "fallbacks": len(backend.report.fallbacks),
    }


def _inference_row(model: nn.Module, inputs: tuple[Any, ...], **options: Any) -> Row:
    torch._dynamo.reset()
    dynamic = options.pop("dynamic", None)
    backend = _backend(**options)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch.no_grad():
        expected = model(*inputs)
        got = compiled(*inputs)  # compiles: profiled below on a second call
        _, ops = executed_ops(lambda: compiled(*inputs))
    return {
        "fused": _fused(backend),
        "executed": dict(ops),
        "out_diff": _max_diff(got, expected),
        "fallbacks": len(backend.report.fallbacks),
    }


# ---------------------------------------------------------------------------------------------------- workflows


def hf_llama_checkpointing() -> Row:
    model, inputs = load_model("hf:llama", batch=2, seq=16)
    hf_model: Any = model.model
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _training_row(model.train(), inputs)


def hf_llama_checkpointing_side_effects_skipped() -> Row:
    """The same with Dynamo told to skip forward side effects in the recompute: transformers' `kernels` hub
    wrapper writes a global in every layer, which otherwise makes Dynamo run each checkpointed layer eagerly."""
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        return hf_llama_checkpointing()


class _CheckpointedBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)

    def _attend(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.utils.checkpoint.checkpoint(self._attend, x, use_reentrant=False)


def utils_checkpoint() -> Row:
    torch.manual_seed(0)
    return _training_row(_CheckpointedBlock().train(), (torch.randn(2, 16, 32),))


def dynamic_shapes() -> Row:
    rows: list[Row] = []
    for name in ("demo", "hf:llama"):
        model, _ = load_model(name, batch=2, seq=16)
        torch._dynamo.reset()
        backend = _backend()
        compiled = torch.compile(model, backend=backend, dynamic=True)
        worst = 0.0
        with torch.no_grad():
            for seq in (8, 17, 33):
                _, inputs = load_model(name, batch=2, seq=seq)
                worst = max(worst, _max_diff(compiled(*inputs), model(*inputs)))
        rows.append({"model": name, "fused": _fused(backend), "graphs": backend.report.graphs, "out_diff": worst})
    return {"fused": {r["model"]: r["fused"] for r in rows}, "graphs": sum(r["graphs"] for r in rows),
            "out_diff": max(r["out_diff"] for r in rows)}  # fmt: skip


def encoder_fast_path() -> Row:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return _inference_row(model, (torch.randn(2, 16, 32),))


def multihead_fast_path() -> Row:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: Tensor) -> Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    return _inference_row(Wrapper().eval(), (torch.randn(2, 16, 32),))


class _NanoGPTAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, block: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        bias: Any = self.bias
        att = att.masked_fill(bias[:, :, :n, :n] == 0, float("-inf"))
        return (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)


def causal_buffer() -> Row:
    torch.manual_seed(0)
    model = _NanoGPTAttention().eval()
    backend = _backend()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        diff = _max_diff(compiled(x), model(x))
        buffer: Any = model.bias
        buffer.fill_(1.0)  # the user changes the buffer: the compiled model must honour it
        diff_after = _max_diff(compiled(x), model(x))
    specs = [s.spec for s in backend.report.sites if s.kind == "attention" and s.spec is not None]
    proven = bool(specs) and all(getattr(s, "causal", False) and getattr(s, "mask", "none") == "none" for s in specs)
    return {"fused": _fused(backend), "causal_proven": proven, "out_diff": diff, "out_diff_after_change": diff_after}


class _LearnedBias(nn.Module):
    """T5-style: a bucketed relative-position bias from an nn.Embedding added to the scores."""

    def __init__(self, dim: int = 32, heads: int = 4, buckets: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel = nn.Embedding(buckets, heads)
        self.buckets = buckets

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        pos = torch.arange(n)
        bucket = (pos[None, :] - pos[:, None]).clamp(-self.buckets // 2, self.buckets // 2 - 1) + self.buckets // 2
        bias = self.rel(bucket).permute(2, 0, 1)[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, d)


def learned_bias() -> Row:
    torch.manual_seed(0)
    return _training_row(_LearnedBias().train(), (torch.randn(2, 16, 32),))


def _hf_tiny(config_class: str, model_class: str, **config: Any) -> tuple[nn.Module, tuple[Any, ...]]:
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_class)(**config)
    model = getattr(transformers, model_class)._from_config(cfg, attn_implementation=config.pop("_impl", "eager"))
    return model.eval(), (torch.randint(0, 128, (2, 16)),)


class _Logits(nn.Module):
    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(*inputs, **self.kwargs).logits


_LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 128}  # fmt: skip


def deepseek_v3() -> Row:
    model, inputs = _hf_tiny(
        "DeepseekV3Config", "DeepseekV3ForCausalLM", **{**_LLAMA_LIKE, "num_key_value_heads": 4},
        moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rope_interleave=True,
    )  # fmt: skip
    return _inference_row(_Logits(model, use_cache=False), inputs)


def gpt_oss() -> Row:
    model, inputs = _hf_tiny(
        "GptOssConfig", "GptOssForCausalLM", **_LLAMA_LIKE, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8,
    )  # fmt: skip
    return _inference_row(_Logits(model, use_cache=False), inputs)


def mpt() -> Row:
    model, inputs = _hf_tiny("MptConfig", "MptForCausalLM", d_model=64, n_heads=4, n_layers=2, vocab_size=128)
    return _inference_row(_Logits(model, use_cache=False), inputs)


def llama_default_call() -> Row:
    """HF's default call: use_cache is on, so attention runs through a DynamicCache."""
    model, inputs = _hf_tiny("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE)
    return _inference_row(_Logits(model), inputs)


def _op_case(fn: Callable[[], tuple[Tensor, Tensor]]) -> Row:
    got, expected = fn()
    return {"out_diff": _max_diff(got, expected)}


def strided_v() -> Row:
    import tilefuse

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    v = torch.randn(2, 4, 8, 16).transpose(-1, -2)  # last-dimension stride 16
    return _op_case(lambda: (tilefuse.ops.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)))


def sdpa_scale_zero() -> Row:
    torch.manual_seed(0)

    class Zero(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, scale=0.0)

    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    return _inference_row(Zero(), (q, k, v))


def per_batch_mask() -> Row:
    torch.manual_seed(0)

    class Packed(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor, doc: Tensor) -> Tensor:
            mask = (doc[:, None, :, None] == doc[:, None, None, :]) & torch.ones(
                doc.shape[1], doc.shape[1], dtype=torch.bool
            ).tril()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(2, 4, 32, 8) for _ in range(3))
    doc = torch.tensor([[0] * 12 + [1] * 20, [0] * 5 + [1] * 27])
    return _inference_row(Packed(), (q, k, v, doc))


WORKFLOWS: dict[str, Callable[[], Row]] = {
    "hf_llama_checkpointing": hf_llama_checkpointing,
    "hf_llama_checkpointing_side_effects_skipped": hf_llama_checkpointing_side_effects_skipped,
    "utils_checkpoint": utils_checkpoint,
    "dynamic_shapes": dynamic_shapes,
    "encoder_fast_path": encoder_fast_path,
    "multihead_fast_path": multihead_fast_path,
    "causal_buffer": causal_buffer,
    "learned_bias": learned_bias,
    "deepseek_v3": deepseek_v3,
    "gpt_oss": gpt_oss,
    "mpt": mpt,
    "llama_default_call": llama_default_call,
    "strided_v": strided_v,
    "sdpa_scale_zero": sdpa_scale_zero,
    "per_batch_mask": per_batch_mask,
}


def run(names: list[str]) -> dict[str, Row]:
    results: dict[str, Row] = {}
    for name in names:
        try:
            results[name] = WORKFLOWS[name]()
        except Exception as err:  # a workflow that crashes is a result too
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"{name:44s} {json.dumps(results[name], default=str)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(WORKFLOWS), help="run only these workflows")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("tilefuse").setLevel(logging.ERROR)
    results = run(args.only or list(WORKFLOWS))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "workflows": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
