"""A tiny Llama-style decoder in plain torch: the built-in model of `tilefuse demo`, no download needed.

It spells attention, RMSNorm and RoPE the way Hugging Face's eager Llama does (fp32 norm statistics,
rotate-half RoPE, repeat_kv for GQA, an arange-built causal mask, fp32 softmax), so the recognizers see
realistic graphs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, with the statistics taken in fp32."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate-half RoPE on [batch, heads, seq, head_dim] tensors; cos/sin are [seq, head_dim]."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x: Tensor, group: int) -> Tensor:
    """[batch, kv_heads, seq, d] -> [batch, kv_heads * group, seq, d] through expand + reshape, as HF does."""
    if group == 1:
        return x
    batch, kv_heads, seq, dim = x.shape
    x = x[:, :, None, :, :].expand(batch, kv_heads, group, seq, dim)
    return x.reshape(batch, kv_heads * group, seq, dim)


def causal_mask(seq: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive [seq, seq] mask built from position comparisons: 0 where key <= query, dtype-min elsewhere."""
    query_pos = torch.arange(seq, device=device)[:, None]
    key_pos = torch.arange(seq, device=device)[None, :]
    return torch.where(key_pos <= query_pos, 0.0, torch.finfo(dtype).min).to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotate-half RoPE for positions 0..seq-1."""

    inv_freq: Tensor

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        positions = torch.arange(seq, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def _split_heads(self, x: Tensor, heads: int) -> Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        q = self._split_heads(self.q_proj(x), self.heads)
        k = self._split_heads(self.k_proj(x), self.kv_heads)
        v = self._split_heads(self.v_proj(x), self.kv_heads)
        q, k = apply_rope(q, k, cos, sin)
        group = self.heads // self.kv_heads
        k, v = repeat_kv(k, group), repeat_kv(v, group)
        scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim)) + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(out)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(hidden)
        self.attn = Attention(hidden, heads, kv_heads)
        self.post_attn_norm = RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, 2 * hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        return x + self.mlp(self.post_attn_norm(x))


class DemoDecoder(nn.Module):
    """input_ids [batch, seq] -> logits [batch, seq, vocab]."""

    def __init__(self, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rotary = RotaryEmbedding(hidden // heads)
        self.layers = nn.ModuleList(DecoderLayer(hidden, heads, kv_heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        seq = input_ids.shape[1]
        cos, sin = self.rotary(seq, x.dtype)
        mask = causal_mask(seq, x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def build_demo_model(
    layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 128, seed: int = 0
) -> nn.Module:
    """The demo decoder with random weights drawn from `seed`, in eval mode."""
    for name, value in (
        ("layers", layers),
        ("hidden", hidden),
        ("heads", heads),
        ("kv_heads", kv_heads),
        ("vocab", vocab),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"build_demo_model: {name} must be a positive int, got {value!r}")
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ValueError(
            f"build_demo_model: need hidden % heads == 0, heads % kv_heads == 0 and an even head dim; "
            f"got hidden={hidden}, heads={heads}, kv_heads={kv_heads}"
        )
    torch.manual_seed(seed)
    return DemoDecoder(layers, hidden, heads, kv_heads, vocab).eval()


def demo_inputs(batch: int = 2, seq: int = 16, vocab: int = 128, seed: int = 0) -> tuple[Tensor]:
    """Random token ids [batch, seq], the same for the same arguments."""
    if batch < 1 or seq < 1:
        raise ValueError(f"demo_inputs: batch and seq must be >= 1, got batch={batch}, seq={seq}")
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (batch, seq), generator=generator),)
