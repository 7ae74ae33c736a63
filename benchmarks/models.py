"""Llama-style transformers models built from a LlamaConfig with random weights (no downloads)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def params(self) -> dict[str, Any]:
        return asdict(self)


TINY = LlamaShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128)
# Llama-3.2-1B's shape with a 32k vocabulary: ~1.0B parameters.
ONE_B = LlamaShape(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=32000)


def with_layers(shape: LlamaShape, layers: int) -> LlamaShape:
    return replace(shape, layers=layers)


class Logits(nn.Module):
    """input_ids -> logits as a plain tensor (no cache), so every backend sees the same simple signature."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        logits: Tensor = self.model(input_ids=ids, use_cache=False).logits
        return logits


def llama(shape: LlamaShape, *, attn: str = "sdpa", seq: int = 2048, seed: int = 0) -> Logits:
    """A LlamaForCausalLM of `shape` with random weights (fp32, eval mode; move/cast it as needed)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(seq, 128),
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn)
    return Logits(model.eval())


def transformers_missing() -> str | None:
    """Why the Llama models cannot be built here, or None when transformers imports."""
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        return f"transformers is not importable: {err}"
    return None


def token_ids(shape: LlamaShape, batch: int, seq: int, device: torch.device, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab, (batch, seq), generator=gen).to(device)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
