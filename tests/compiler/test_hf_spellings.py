"""RoPE and causal-mask spellings of current transformers models: DeepSeek-V3 and GPT-OSS rotations written on two
views of x with per-pair tables, MPT's additive causal mask cast to bool, T5's causal mask combined with its
position bias under SDPA. Tiny configs with random weights, built in code."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tilefuse
from tilefuse.compiler.options import Options
from tilefuse.compiler.presets import HFOutput

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 128, 12
_SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _deepseek_v3() -> Any:
    return transformers.DeepseekV3Config(
        **_SMALL, num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        rope_interleave=True,
    )  # fmt: skip


def _gpt_oss() -> Any:
    return transformers.GptOssConfig(
        **_SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
        num_experts_per_tok=1, sliding_window=8,
    )  # fmt: skip


CONFIGS: dict[str, tuple[Any, str, str]] = {  # name: (config factory, model class, attention implementation)
    "deepseek_v3": (_deepseek_v3, "DeepseekV3ForCausalLM", "eager"),
    "gpt_oss": (_gpt_oss, "GptOssForCausalLM", "eager"),
    "mpt": (
        lambda: transformers.MptConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=VOCAB, max_seq_len=64),
        "MptForCausalLM",
        "eager",
    ),
    "t5_sdpa": (
        lambda: transformers.T5Config(
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, decoder_start_token_id=0
        ),
        "T5ForConditionalGeneration",
        "sdpa",
    ),
}


def _compile(name: str) -> tuple[Any, Any, tuple[torch.Tensor, ...], tilefuse.FusionReport]:
    config_factory, model_class, attn = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)._from_config(config_factory(), attn_implementation=attn)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    names, inputs = (
        (("input_ids", "decoder_input_ids"), (ids, ids[:, :9])) if "t5" in name else (("input_ids",), (ids,))
    )
    wrapped = HFOutput(model.eval(), names, "logits", {"use_cache": False}).eval()
    backend = tilefuse.TilefuseBackend(Options(strict=True, inner="eager"))
    return wrapped, torch.compile(wrapped, backend=backend), inputs, backend.report


def _run(name: str) -> tuple[list[Any], list[Any]]:
    """Compile and run `name`; outputs match eager. Returns its (fused RoPE specs, fused attention specs)."""
    model, compiled, inputs, report = _compile(name)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    fused = [s for s in report.sites if s.status == "fused"]
    return [s.spec for s in fused if s.kind == "rope"], [s.spec for s in fused if s.kind == "attention"]


def test_deepseek_v3_rope_fused_and_causal() -> None:
    """rope_interleave=True (the default): interleaved pairs in, halves out (rope_interleave=False is Llama's)."""
    ropes, attentions = _run("deepseek_v3")
    assert [r.source for r in ropes] == ["split_pairs"] * 2  # q and k
    assert len(attentions) == 1 and all(a.causal and a.mask == "none" for a in attentions)


def test_gpt_oss_rope_and_sink_attention_fused() -> None:
    """GPT-OSS's RoPE (chunked halves, per-pair tables) fuses, and so does its attention with a learned sink logit
    per head (passes/attention_sinks.py)."""
    ropes, attentions = _run("gpt_oss")
    assert [(r.source, r.layout, r.rotary_dim) for r in ropes] == [("split_halves", "rotate_half", 16)] * 2
    assert len(attentions) == 1 and all(a.sinks and a.causal for a in attentions)


def test_mpt_causal_proven() -> None:
    _, attentions = _run("mpt")
    assert len(attentions) == 1 and all(a.causal and a.mask == "none" and a.alibi for a in attentions)


def test_t5_decoder_causal_under_sdpa() -> None:
    """The decoder's self-attention is causal, its learned position bias stays an additive tensor."""
    _, attentions = _run("t5_sdpa")
    assert [a.causal for a in attentions] == [False, True, False]  # encoder, decoder self, decoder cross
    assert attentions[1].mask == "additive"
