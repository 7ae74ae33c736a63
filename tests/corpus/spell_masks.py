"""Masks and position biases as libraries build them: causal, sliding window, ALiBi and padding.

Each positive must reach the attention op as AttentionSpec fields (causal / window / alibi) rather than an N×N
data mask; each negative (a symmetric band, a causal mask shifted by one, a window one wider, learned slopes, a
mask read from data) must not, and stays a data mask or additive bias the op reads as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _corpus import Spelling
from torch import Tensor, nn

from tilefuse.benchmarks.harness import perturbed

B, H, N, D = 2, 4, 12, 8
WINDOW = 4
FILL = -2.3819763e38  # torchtune Gemma2's mask value


def _qkv(n_q: int = N, n_k: int = N) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, n, D, generator=gen) for n in (n_q, n_k, n_k))  # type: ignore[return-value]


def _scores(q: Tensor, k: Tensor) -> Tensor:
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


class Attend(nn.Module):
    """softmax(q·kᵀ/√d + mask(q, k, v)) v for a mask builder written after a library."""

    def __init__(self, mask: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return (_scores(q, k) + self.mask(q, k)).softmax(-1) @ v


def _expect(**fields: Any) -> Callable[[dict[str, list[Any]]], None]:
    def check(specs: dict[str, list[Any]]) -> None:
        for spec in specs["attention"]:
            got = {name: getattr(spec, name) for name in fields}
            assert got == fields, (got, fields)

    return check


def _fused(**fields: Any) -> dict[str, Any]:
    return {"fused": {"attention": 1}, "check_specs": _expect(**fields)}


# ------------------------------------------------------------------------------------------------ torchtune
def torchtune_gemma2(q: Tensor, k: Tensor) -> Tensor:
    """Gemma2Attention: default causal tril as a -2.38e38/0 bias, a band triu(ones, 1 - W) · tril(ones, W - 1)
    compared with 1 selects it (a symmetric band: only the causal mask makes it a sliding window)."""
    s = q.shape[-2]
    mask = torch.tril(torch.ones(size=(s, s), dtype=torch.bool))
    mask = torch.where(mask.logical_not(), FILL, 0)
    all_ones = torch.ones_like(mask)
    sliding = torch.triu(all_ones, -1 * WINDOW + 1) * torch.tril(all_ones, WINDOW - 1)
    return torch.where(sliding == 1, mask, FILL)


def _gemma2_module() -> nn.Module:
    from torchtune.models.gemma2._attention import Gemma2Attention

    dim = H * D
    return Gemma2Attention(
        embed_dim=dim, num_heads=H, num_kv_heads=H, head_dim=D,
        q_proj=nn.Linear(dim, dim), k_proj=nn.Linear(dim, dim), v_proj=nn.Linear(dim, dim),
        output_proj=nn.Linear(dim, dim), sliding_window_size=WINDOW, query_pre_attn_scalar=D,
    )  # fmt: skip


class TorchtuneGemma2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = perturbed(_gemma2_module())

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x)


class BlockCausal(nn.Module):
    """torchtune's packed block-causal mask as a mask_mod over tensors: causal and same document."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor) -> Tensor:
        idx = torch.arange(q.shape[-2])
        causal = idx[:, None] >= idx[None, :]
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(causal & same_doc)[:, None])


def _documents() -> Tensor:
    return torch.tensor([[0] * 5 + [1] * 7, [0] * 12])


# ------------------------------------------------------------------------------------------- x-transformers
class XAttend(nn.Module):
    """x-transformers' Attend (the real module), optionally with its ALiBi bias or a `max_attend_past` window."""

    def __init__(self, causal: bool, alibi_heads: int = 0, flash: bool = False, attend_past: int = 0) -> None:
        super().__init__()
        from x_transformers.attend import Attend as XAttendCore
        from x_transformers.x_transformers import AlibiPositionalBias

        self.attend = XAttendCore(causal=causal, flash=flash)
        self.alibi = AlibiPositionalBias(heads=alibi_heads, total_heads=H) if alibi_heads else None
        self.attend_past = attend_past

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        i, j = q.shape[-2], k.shape[-2]
        bias = self.alibi(i, j) if self.alibi is not None else None
        mask = None
        if self.attend_past:  # Attention.forward: ~or_reduce(masks), masks holding "masked out" positions
            dist = torch.arange(j - i, j)[:, None] - torch.arange(j)[None, :]
            masks = [(dist > self.attend_past)[None, None], torch.zeros(1, 1, 1, j, dtype=torch.bool)]
            head = masks[0]
            for rest in masks[1:]:
                head = head | rest
            mask = ~head
        return self.attend(q, k, v, mask=mask, attn_bias=bias)[0]


# -------------------------------------------------------------------------------------------------- litgpt
def litgpt_sliding_window(q: Tensor, k: Tensor) -> Tensor:
    """CausalSelfAttention with a sliding window: an additive causal mask written in place, plus a -inf band below
    `tril(ones, -W)` added in place."""
    t = q.shape[-2]
    mask = torch.ones(t, t, dtype=q.dtype).triu(diagonal=1)
    mask.masked_fill_(mask.bool(), float("-inf"))
    mask = mask.view(1, 1, *mask.shape)
    sliding_window_bias = torch.ones_like(mask).tril(diagonal=-WINDOW)
    sliding_window_bias.masked_fill_(sliding_window_bias.bool(), float("-inf"))
    mask += sliding_window_bias
    return mask


class LitgptSdpa(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=litgpt_sliding_window(q, k))


# ------------------------------------------------------------------------------------------------ diffusers
class DiffusersPadded(nn.Module):
    """diffusers' classic Attention with a key padding mask: `(1 - keep) * -10000` repeated per head by
    `prepare_attention_mask`, read by baddbmm (AttnProcessor) or SDPA (AttnProcessor2_0)."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

        processor = AttnProcessor2_0() if sdpa else AttnProcessor()
        self.attn = perturbed(Attention(query_dim=H * D, heads=H, dim_head=D, processor=processor))

    def forward(self, x: Tensor, context: Tensor, keep: Tensor) -> Tensor:
        bias = (1 - keep.to(x.dtype)) * -10000.0
        return self.attn(x, context, attention_mask=bias.unsqueeze(1))


def _padding() -> Tensor:
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, 7:] = False
    return keep


# ---------------------------------------------------------------------------------------------- negatives
def symmetric_window(q: Tensor, k: Tensor) -> Tensor:
    """A two-sided band |q - k| < W without a causal mask: no `window` (that bounds only how far back)."""
    idx = torch.arange(q.shape[-2])
    return torch.zeros(()).masked_fill((idx[:, None] - idx[None, :]).abs() >= WINDOW, float("-inf"))


def causal_shifted(q: Tensor, k: Tensor) -> Tensor:
    """tril(diagonal=1): every query also sees the next key. Not causal."""
    keep = torch.tril(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool), diagonal=1)
    return torch.where(keep, 0.0, float("-inf"))


def window_off_by_one(q: Tensor, k: Tensor) -> Tensor:
    """Causal, and q - k <= W (not < W): a window of W + 1."""
    idx = torch.arange(q.shape[-2])
    keep = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] <= WINDOW)
    return torch.where(keep, 0.0, torch.finfo(q.dtype).min)


class LearnedSlopes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.slopes = nn.Parameter(2.0 ** (-8.0 * torch.arange(1, H + 1) / H))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        idx = torch.arange(q.shape[-2])
        bias = self.slopes.view(1, H, 1, 1) * (idx[None, :] - idx[:, None])
        bias = bias.masked_fill(idx[None, :] > idx[:, None], float("-inf"))
        return (_scores(q, k) + bias).softmax(-1) @ v


def data_dependent(q: Tensor, k: Tensor) -> Tensor:
    """Keys whose mean is negative are masked: read from data."""
    keep = (k.mean(-1) >= 0)[:, :, None, :]
    keep = keep | torch.eye(q.shape[-2], dtype=torch.bool)  # every row keeps a key
    return torch.zeros(()).masked_fill(~keep, float("-inf"))


def _plain(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], tuple[nn.Module, tuple[Any, ...]]]:
    return lambda: (Attend(fn), _qkv())


def _x(n_q: int = N, **kwargs: Any) -> Callable[[], tuple[nn.Module, tuple[Any, ...]]]:
    return lambda: (XAttend(**kwargs), _qkv(n_q, N))


SPELLINGS = [
    # torchtune
    Spelling("gemma2_sliding_window", "torchtune", _plain(torchtune_gemma2),
             **_fused(causal=True, window=WINDOW, mask="none")),
    Spelling("gemma2_attention_module", "torchtune", lambda: (TorchtuneGemma2(), (torch.randn(B, N, H * D),)),
             **_fused(causal=True, window=WINDOW, mask="none")),
    Spelling("packed_block_causal", "torchtune", lambda: (BlockCausal(), (*_qkv(), _documents())),
             **_fused(causal=True, window=None, mask="boolean")),
    # x-transformers
    Spelling("attend_causal", "x_transformers", _x(causal=True), **_fused(causal=True, mask="none")),
    Spelling("attend_causal_kv_longer", "x_transformers", _x(n_q=5, causal=True),
             **_fused(causal=True, align="bottom_right", mask="none")),
    Spelling("attend_causal_flash", "x_transformers", _x(causal=True, flash=True), **_fused(causal=True, mask="none")),
    Spelling("alibi_causal", "x_transformers", _x(causal=True, alibi_heads=H),
             **_fused(causal=True, alibi=True, mask="none")),
    Spelling("alibi_causal_kv_longer", "x_transformers", _x(n_q=5, causal=True, alibi_heads=H),
             **_fused(causal=True, align="bottom_right", alibi=True, mask="none")),
    Spelling("alibi_causal_partial_heads", "x_transformers", _x(causal=True, alibi_heads=3),
             **_fused(causal=True, alibi=True, mask="none")),
    Spelling("alibi_causal_flash", "x_transformers", _x(causal=True, alibi_heads=H, flash=True),
             **_fused(causal=True, alibi=True, mask="none")),
    Spelling("alibi_symmetric", "x_transformers", _x(causal=False, alibi_heads=H),
             **_fused(causal=False, alibi=False, mask="additive")),
    Spelling("max_attend_past", "x_transformers", _x(causal=True, attend_past=WINDOW - 1),
             **_fused(causal=True, window=WINDOW, mask="none")),
    # litgpt
    Spelling("sliding_window", "litgpt", lambda: (LitgptSdpa(), _qkv()),
             **_fused(causal=True, window=WINDOW, mask="none")),
    # diffusers: -10000 does not absorb the scores (a fully padded row is a softmax of them in eager): additive
    Spelling("padding_mask_baddbmm", "diffusers",
             lambda: (DiffusersPadded(sdpa=False), (torch.randn(B, N, H * D), torch.randn(B, N, H * D), _padding())),
             **_fused(causal=False, mask="additive")),
    Spelling("padding_mask_sdpa", "diffusers",
             lambda: (DiffusersPadded(sdpa=True), (torch.randn(B, N, H * D), torch.randn(B, N, H * D), _padding())),
             **_fused(causal=False, mask="additive")),
    # negatives: look-alikes that are not the meaning
    Spelling("symmetric_window", "hand", _plain(symmetric_window), **_fused(causal=False, window=None, mask="boolean")),
    Spelling("causal_shifted_by_one", "hand", _plain(causal_shifted), **_fused(causal=False, mask="boolean")),
    Spelling("window_off_by_one", "hand", _plain(window_off_by_one), **_fused(causal=True, window=WINDOW + 1)),
    Spelling("alibi_learned_slopes", "hand", lambda: (LearnedSlopes(), _qkv()),
             **_fused(causal=True, alibi=False, mask="additive")),
    Spelling("data_dependent_mask", "hand", _plain(data_dependent), **_fused(causal=False, mask="boolean")),
]  # fmt: skip
