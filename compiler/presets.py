"""Named models for the CLI: the built-in demo, tiny Hugging Face configs, or `package.module:factory`.

Every preset returns `(module, example_inputs)` with random weights (seed 0) in eval mode; calling
`module(*example_inputs)` returns a plain tensor. Hugging Face presets take an attention implementation
suffix: `hf:llama@sdpa` or `hf:llama@eager` (the default).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .demo_model import build_demo_model, demo_inputs

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
VOCAB = 128
_TINY_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
}
_TINY_GPT: dict[str, Any] = {
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": VOCAB,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
_TINY_ENCODER: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


@dataclass(frozen=True)
class HFPreset:
    """How to build one tiny transformers model and its example inputs.

    inputs: "tokens" (input_ids), "padded_tokens" (input_ids + attention_mask with padding) or "pixels".
    positions_key: the config field holding the maximum sequence length, raised to fit `seq`.
    """

    config_class: str
    model_class: str
    config: Mapping[str, Any]
    output: str = "logits"
    inputs: str = "tokens"
    positions_key: str | None = "max_position_embeddings"
    call_kwargs: Mapping[str, Any] = field(default_factory=lambda: {"use_cache": False})


HF_PRESETS: dict[str, HFPreset] = {
    "hf:llama": HFPreset("LlamaConfig", "LlamaForCausalLM", _TINY_LLAMA_LIKE),
    "hf:mistral": HFPreset("MistralConfig", "MistralForCausalLM", {**_TINY_LLAMA_LIKE, "sliding_window": 8}),
    "hf:qwen2": HFPreset("Qwen2Config", "Qwen2ForCausalLM", _TINY_LLAMA_LIKE),
    "hf:gemma": HFPreset("GemmaConfig", "GemmaForCausalLM", {**_TINY_LLAMA_LIKE, "head_dim": 16}),
    "hf:gemma2": HFPreset(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            **_TINY_LLAMA_LIKE,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    # Phi's default partial_rotary_factor (0.5) rotates only the first half of each head.
    "hf:phi": HFPreset("PhiConfig", "PhiForCausalLM", _TINY_LLAMA_LIKE),
    "hf:gpt2": HFPreset("GPT2Config", "GPT2LMHeadModel", _TINY_GPT, positions_key="n_positions"),
    # GPT-J rotates interleaved pairs of the first rotary_dim (8 of 16) features.
    "hf:gptj": HFPreset("GPTJConfig", "GPTJForCausalLM", {**_TINY_GPT, "rotary_dim": 8}, positions_key="n_positions"),
    "hf:opt": HFPreset(
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 64,
            "vocab_size": VOCAB,
        },
    ),
    # BLOOM adds ALiBi. Without an attention_mask its positions are an arange, which the attention pass proves
    # and hands to the kernel as slopes; with one they come from attention_mask.cumsum (data), which stays an
    # additive [B, H, 1, N] bias (see passes/alibi.py), so the preset runs unpadded.
    "hf:bloom": HFPreset(
        "BloomConfig",
        "BloomForCausalLM",
        {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB},
        positions_key=None,
    ),
    "hf:bert": HFPreset(
        "BertConfig",
        "BertModel",
        {**_TINY_ENCODER, "vocab_size": VOCAB},
        output="last_hidden_state",
        inputs="padded_tokens",
        call_kwargs={},
    ),
    "hf:vit": HFPreset(
        "ViTConfig",
        "ViTModel",
        {**_TINY_ENCODER, "image_size": 32, "patch_size": 8},
        output="last_hidden_state",
        inputs="pixels",
        positions_key=None,
        call_kwargs={},
    ),
}
PRESET_NAMES: tuple[str, ...] = ("demo", *HF_PRESETS)


class HFOutput(nn.Module):
    """Calls a transformers model with named inputs and returns one field of its output as a plain tensor."""

    def __init__(
        self, model: nn.Module, input_names: tuple[str, ...], output: str, call_kwargs: Mapping[str, Any]
    ) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output = output
        self.call_kwargs = dict(call_kwargs)

    def forward(self, *inputs: Tensor) -> Tensor:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        result = self.model(**kwargs, **self.call_kwargs)
        out: Tensor = getattr(result, self.output)
        return out


def load_model(name: str, *, batch: int = 2, seq: int = 16) -> tuple[nn.Module, tuple[Any, ...]]:
    """Build the model called `name` and its example inputs.

    name: "demo", a Hugging Face preset ("hf:llama", "hf:llama@sdpa", ... see PRESET_NAMES) or
    "package.module:factory" where `factory()` returns `(model, example_inputs)` (it receives `batch=` and
    `seq=` when its signature has them).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"load_model: name must be a non-empty str, got {name!r}")
    for arg, value in (("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"load_model: {arg} must be an int >= 1, got {value!r}")
    if name == "demo":
        return build_demo_model(vocab=VOCAB), demo_inputs(batch, seq, vocab=VOCAB)
    if name.startswith("hf:"):
        preset_name, attn_impl = _split_attn_impl(name)
        return _load_hf(preset_name, attn_impl, batch, seq)
    if ":" in name:
        return _load_factory(name, batch, seq)
    raise ValueError(_unknown_message(name))


def _unknown_message(name: str) -> str:
    return (
        f"unknown model {name!r}; choose a preset ({', '.join(PRESET_NAMES)}), optionally with "
        f"@{'|@'.join(ATTN_IMPLEMENTATIONS)} after an hf: preset, or give package.module:factory"
    )


def _split_attn_impl(name: str) -> tuple[str, str]:
    preset_name, _, attn_impl = name.partition("@")
    if preset_name not in HF_PRESETS:
        raise ValueError(_unknown_message(name))
    attn_impl = attn_impl or "eager"
    if attn_impl not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"model {name!r}: attention implementation {attn_impl!r} is not one of {list(ATTN_IMPLEMENTATIONS)}"
        )
    return preset_name, attn_impl


def _import_transformers(name: str) -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError(f"model {name!r} needs the `hf` extra (transformers): pip install 'tilefuse[hf]'") from exc


def _load_hf(name: str, attn_impl: str, batch: int, seq: int) -> tuple[nn.Module, tuple[Any, ...]]:
    preset = HF_PRESETS[name]
    transformers = _import_transformers(name)
    config_kwargs = dict(preset.config)
    if preset.positions_key is not None:
        config_kwargs[preset.positions_key] = max(128, seq)
    config = getattr(transformers, preset.config_class)(**config_kwargs)
    model_class = getattr(transformers, preset.model_class)
    if attn_impl == "sdpa" and not getattr(model_class, "_supports_sdpa", False):
        raise ValueError(
            f"model {name!r}: transformers {transformers.__version__} has no sdpa attention for "
            f"{preset.model_class}; use {name}@eager"
        )
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation=attn_impl, dtype=torch.float32)
    input_names, inputs = _hf_inputs(preset, config, batch, seq)
    return HFOutput(model.eval(), input_names, preset.output, preset.call_kwargs).eval(), inputs


def _hf_inputs(preset: HFPreset, config: Any, batch: int, seq: int) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    if preset.inputs == "pixels":
        size = config.image_size
        return ("pixel_values",), (torch.randn(batch, config.num_channels, size, size, generator=generator),)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    if preset.inputs == "tokens":
        return ("input_ids",), (input_ids,)
    return ("input_ids", "attention_mask"), (input_ids, padding_mask(batch, seq))


def padding_mask(batch: int, seq: int) -> Tensor:
    """A key-padding mask (1 = token, 0 = padding) whose last row pads its last quarter of positions."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - seq // 4 :] = 0
    return mask


def _load_factory(name: str, batch: int, seq: int) -> tuple[nn.Module, tuple[Any, ...]]:
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise ValueError(_unknown_message(name))
    factory: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        if not hasattr(factory, attr):
            raise ValueError(f"model {name!r}: module {module_name!r} has no attribute {attr_path!r}")
        factory = getattr(factory, attr)
    if not callable(factory):
        raise TypeError(f"model {name!r}: {attr_path!r} is not callable")
    return _check_factory_result(name, factory(**_size_kwargs(factory, batch, seq)))


def _size_kwargs(factory: Any, batch: int, seq: int) -> dict[str, int]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    return {key: value for key, value in (("batch", batch), ("seq", seq)) if key in params}


def _check_factory_result(name: str, result: Any) -> tuple[nn.Module, tuple[Any, ...]]:
    prefix = f"model {name!r}: the factory must return (model: nn.Module, example_inputs: tuple)"
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"{prefix}, got {type(result).__name__}")
    model, inputs = result
    if not isinstance(model, nn.Module):
        raise TypeError(f"{prefix}, got a model of type {type(model).__name__}")
    if not isinstance(inputs, (tuple, list)):
        raise TypeError(f"{prefix}, got example_inputs of type {type(inputs).__name__}")
    return model, tuple(inputs)
