"""Attention spellings for the recognizer tests: each is a function of (q, k, v, *extras) wrapped in a module,
with the inputs it takes and the AttentionSpec fields it must produce."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

B, H = 2, 4
WINDOW = 4
SOFTCAP = 5.0
NEG_INF = float("-inf")


@dataclass(frozen=True)
class Shape:
    """q is [B, H, nq, d]; k and v are [B, kv_heads, nk, d]."""

    nq: int
    nk: int
    d: int
    kv_heads: int = H
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"q{self.nq}k{self.nk}d{self.d}h{self.kv_heads}-{dtype}"


# N in {1, 17} x D in {16, 40}; cross shapes have nq != nk; bottom-right shapes have nq < nk.
SQUARE = (Shape(1, 1, 16), Shape(1, 1, 40), Shape(17, 17, 16), Shape(17, 17, 40))
CROSS = (Shape(1, 17, 16), Shape(5, 17, 40), Shape(17, 5, 16))
DECODE = (Shape(1, 17, 40), Shape(5, 17, 16))
GQA = (Shape(1, 1, 40, kv_heads=2), Shape(17, 17, 16, kv_heads=2), Shape(5, 17, 40, kv_heads=2))
MQA = (Shape(1, 1, 16, kv_heads=1), Shape(17, 17, 40, kv_heads=1))
BF16 = (Shape(17, 17, 40, dtype=torch.bfloat16), Shape(1, 17, 16, dtype=torch.bfloat16))

Extras = Callable[[Shape, torch.Generator], tuple[Tensor, ...]]


class Attend(nn.Module):
    """One attention spelling `fn(q, k, v, *extras)` as a module."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Tensor) -> Any:
        return self.fn(*args)


class DropoutModule(nn.Module):
    """Attention with an nn.Dropout on the probabilities; the tests call it in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.drop(_scores(q, k).softmax(-1)) @ v


def qkv(shape: Shape, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    def rand(heads: int, n: int) -> Tensor:
        return torch.randn(B, heads, n, shape.d, generator=gen).to(shape.dtype)

    return rand(H, shape.nq), rand(shape.kv_heads, shape.nk), rand(shape.kv_heads, shape.nk)


# ----------------------------------------------------------------------------------------------- extras
def no_extras(shape: Shape, gen: torch.Generator) -> tuple[Tensor, ...]:
    return ()


def bool_mask(shape: Shape, gen: torch.Generator) -> tuple[Tensor, ...]:
    """[B, 1, nq, nk] keep-mask; key 0 is always kept so no row is fully masked."""
    keep = torch.rand(B, 1, shape.nq, shape.nk, generator=gen) > 0.3
    keep[..., 0] = True
    return (keep,)


def int_mask(shape: Shape, gen: torch.Generator) -> tuple[Tensor, ...]:
    return (bool_mask(shape, gen)[0].long(),)


def float01_mask(shape: Shape, gen: torch.Generator) -> tuple[Tensor, ...]:
    return (bool_mask(shape, gen)[0].float(),)


def additive_mask(shape: Shape, gen: torch.Generator) -> tuple[Tensor, ...]:
    """[B, 1, nq, nk] bias with -inf at masked keys (key 0 kept)."""
    bias = torch.randn(B, 1, shape.nq, shape.nk, generator=gen)
    return (bias.masked_fill(~bool_mask(shape, gen)[0], NEG_INF).to(shape.dtype),)


def additive_mask_2d(shape: Shape, gen: torch.Generator) -> tuple[Tensor, ...]:
    return (additive_mask(shape, gen)[0][0, 0],)


def key_lengths(shape: Shape) -> Tensor:
    return torch.tensor([shape.nk, max(1, shape.nk - 5)])


def padding_mask(shape: Shape, gen: torch.Generator) -> tuple[Tensor, ...]:
    """[B, 1, 1, nk] True at real (non-padded) keys."""
    keep = torch.arange(shape.nk)[None, :] < key_lengths(shape)[:, None]
    return (keep[:, None, None, :],)


def attention_mask_2d(shape: Shape, gen: torch.Generator) -> tuple[Tensor, ...]:
    """HF-style [B, nk] int64 attention_mask (1 = attend)."""
    return (padding_mask(shape, gen)[0][:, 0, 0].long(),)


def bias_3d(shape: Shape, gen: torch.Generator) -> tuple[Tensor, ...]:
    return (torch.randn(B * H, shape.nq, shape.nk, generator=gen),)


def scale_tensor(shape: Shape, gen: torch.Generator) -> tuple[Tensor, ...]:
    return (torch.tensor(shape.d**-0.5),)


# -------------------------------------------------------------------------------------------- building blocks
def _scores(q: Tensor, k: Tensor) -> Tensor:
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def _positions(s: Tensor) -> tuple[Tensor, Tensor]:
    """(query index [nq, 1], key index [1, nk]) for scores s."""
    nq, nk = s.shape[-2], s.shape[-1]
    return torch.arange(nq, device=s.device)[:, None], torch.arange(nk, device=s.device)[None, :]


def repeat_kv(h: Tensor, n_rep: int) -> Tensor:
    """Hugging Face's repeat_kv: [B, kvh, N, D] -> [B, kvh * n_rep, N, D]."""
    b, kv_heads, n, d = h.shape
    if n_rep == 1:
        return h
    return h[:, :, None, :, :].expand(b, kv_heads, n_rep, n, d).reshape(b, kv_heads * n_rep, n, d)


def _attend(s: Tensor, v: Tensor) -> Tensor:
    return s.softmax(dim=-1) @ v


# --------------------------------------------------------------------------------------------- scale spellings
def scale_mul(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, v)


def scale_div_pow(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, v)


def scale_div_math_sqrt(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), v)


def scale_div_full(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend(q @ k.transpose(-2, -1) / torch.full([], math.sqrt(q.shape[-1])), v)


def scale_on_q(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), v)


def scale_on_k(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend(q @ (k * q.shape[-1] ** -0.5).transpose(-2, -1), v)


def scale_on_kt(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend(q @ (k.transpose(-2, -1) / math.sqrt(q.shape[-1])), v)


def scale_split(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    root = q.shape[-1] ** -0.25
    return _attend((q * root) @ (k * root).transpose(-2, -1), v)


def matmul_functional(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    return torch.matmul(F.softmax(s, dim=-1), v)


def permute_kt(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend(q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1]), v)


def mt_kt(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend(q @ k.mT / math.sqrt(q.shape[-1]), v)


def nn_softmax(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return nn.Softmax(dim=3)(_scores(q, k)) @ v


# ---------------------------------------------------------------------------------------------- dtype spellings
def upcast_scores(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
    return s.softmax(-1).to(q.dtype) @ v


def softmax_dtype_fp32(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.softmax(_scores(q, k), dim=-1, dtype=torch.float32).to(q.dtype) @ v


def type_as_probs(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.softmax(_scores(q, k).float(), dim=-1).type_as(q) @ v


def hf_eager(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor) -> Tensor:
    """transformers' eager_attention_forward, attention weights dropped."""
    groups = q.shape[1] // k.shape[1]
    key_states, value_states = repeat_kv(k, groups), repeat_kv(v, groups)
    attn_weights = torch.matmul(q, key_states.transpose(2, 3)) * q.shape[-1] ** -0.5
    attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
    attn_weights = F.dropout(attn_weights, p=0.1, training=False)
    return torch.matmul(attn_weights, value_states)


# ---------------------------------------------------------------------------------------------- data masks
def add_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return _attend(_scores(q, k) + mask, v)


def masked_fill_not(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    return _attend(_scores(q, k).masked_fill(~keep, NEG_INF), v)


def masked_fill_eq0(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return _attend(_scores(q, k).masked_fill(mask == 0, float("-inf")), v)


def where_neg_inf(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    return _attend(torch.where(keep, _scores(q, k), NEG_INF), v)


def where_finfo_min(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    s = _scores(q, k)
    return _attend(torch.where(keep, s, torch.finfo(s.dtype).min), v)


def where_bool_cast(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return _attend(torch.where(mask.bool(), _scores(q, k), NEG_INF), v)


def bert_extended_mask(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor) -> Tensor:
    s = _scores(q, k)
    extended = (1.0 - attention_mask[:, None, None, :].to(s.dtype)) * torch.finfo(s.dtype).min
    return _attend(s + extended, v)


# ------------------------------------------------------------------------------------------ positional masks
def causal_tril_bool(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    keep = torch.tril(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool))
    return _attend(s.masked_fill(~keep, NEG_INF), v)


def causal_triu_bool(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    future = torch.triu(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool), diagonal=1)
    return _attend(s.masked_fill(future, NEG_INF), v)


def causal_tril_eq0(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """nanoGPT: masked_fill(tril(ones) == 0, -inf) on a float tril."""
    s = _scores(q, k)
    tril = torch.tril(torch.ones(s.shape[-2], s.shape[-1]))
    return _attend(s.masked_fill(tril == 0, float("-inf")), v)


def causal_triu_additive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    return _attend(s + torch.triu(torch.full((s.shape[-2], s.shape[-1]), NEG_INF), 1), v)


def causal_where_additive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    q_idx, k_idx = _positions(s)
    return _attend(s + torch.where(k_idx <= q_idx, 0.0, NEG_INF), v)


def sliding_window_additive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """-inf above the diagonal (future) and at or below diagonal -WINDOW (too far back)."""
    s = _scores(q, k)
    full = torch.full((s.shape[-2], s.shape[-1]), NEG_INF)
    return _attend(s + torch.triu(full, 1) + torch.tril(full, -WINDOW), v)


def causal_arange_where(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    q_idx, k_idx = _positions(s)
    return _attend(torch.where(k_idx <= q_idx, s, NEG_INF), v)


def causal_arange_masked(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    q_idx, k_idx = _positions(s)
    return _attend(s.masked_fill(k_idx > q_idx, NEG_INF), v)


def causal_bottom_right(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    q_idx, k_idx = _positions(s)
    keep = k_idx <= q_idx + (s.shape[-1] - s.shape[-2])
    return _attend(s.masked_fill(~keep, NEG_INF), v)


def sliding_window(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    q_idx, k_idx = _positions(s)
    keep = (k_idx <= q_idx) & (q_idx - k_idx < WINDOW)
    return _attend(s.masked_fill(~keep, NEG_INF), v)


def sliding_window_bottom_right(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    q_idx, k_idx = _positions(s)
    q_pos = q_idx + (s.shape[-1] - s.shape[-2])
    keep = (k_idx <= q_pos) & (q_pos - k_idx < WINDOW)
    return _attend(s.masked_fill(~keep, NEG_INF), v)


def causal_twice(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Top-left and bottom-right causal together: the tighter one (top-left when nq < nk) decides."""
    s = _scores(q, k)
    q_idx, k_idx = _positions(s)
    keep = (k_idx <= q_idx) & (k_idx <= q_idx + (s.shape[-1] - s.shape[-2]))
    return _attend(s.masked_fill(~keep, NEG_INF), v)


def window_only(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    q_idx, k_idx = _positions(s)
    return _attend(s.masked_fill(~(q_idx - k_idx < WINDOW), NEG_INF), v)


def causal_and_padding(q: Tensor, k: Tensor, v: Tensor, pad: Tensor) -> Tensor:
    s = _scores(q, k)
    q_idx, k_idx = _positions(s)
    return _attend(s.masked_fill(~((k_idx <= q_idx) & pad), NEG_INF), v)


# ------------------------------------------------------------------------------------------ softcap, GQA, 3-D
def softcap_div(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend(torch.tanh(_scores(q, k) / SOFTCAP) * SOFTCAP, v)


def softcap_gemma2(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = _scores(q, k)
    s = s * (1.0 / SOFTCAP)
    s = torch.tanh(s)
    return _attend(s * SOFTCAP, v)


def gqa_repeat_kv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    return _attend(_scores(q, repeat_kv(k, groups)), repeat_kv(v, groups))


def gqa_repeat_interleave(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    return _attend(_scores(q, k.repeat_interleave(groups, dim=1)), v.repeat_interleave(groups, dim=1))


def mqa_expand(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attend(_scores(q, k.expand(-1, q.shape[1], -1, -1)), v.expand(-1, q.shape[1], -1, -1))


def bmm_3d(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    q3, k3, v3 = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    s = torch.bmm(q3, k3.transpose(1, 2)) * q.shape[-1] ** -0.5
    return torch.bmm(s.softmax(-1), v3)


def baddbmm_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    q3, k3, v3 = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    s = torch.baddbmm(bias, q3, k3.transpose(1, 2), beta=1, alpha=q.shape[-1] ** -0.5)
    return torch.bmm(s.softmax(-1), v3)


def dropout_eval(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.dropout(_scores(q, k).softmax(-1), p=0.1, training=False) @ v


# ------------------------------------------------------------------------------------------------------ SDPA
def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_scale(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=0.3)


def sdpa_enable_gqa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def sdpa_repeat_kv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)


# ------------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """A spelling, the shapes it runs at, and the spec fields it must give beyond `default_expect`."""

    fn: Callable[..., Any]
    shapes: tuple[Shape, ...] = SQUARE
    extras: Extras = no_extras
    expect: dict[str, Any] = field(default_factory=dict)
    three_d: bool = False
    module: Callable[[], nn.Module] | None = None

    def build(self, shape: Shape, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, ...]]:
        gen = torch.Generator().manual_seed(seed)
        inputs = (*qkv(shape, gen), *self.extras(shape, gen))
        module = self.module() if self.module is not None else Attend(self.fn)
        return module.eval(), inputs


SDPA_SOURCE = {"source": "scaled_dot_product_attention"}
CAUSAL = {"causal": True}

CASES: dict[str, Case] = {
    "scale_mul": Case(scale_mul),
    "scale_div_pow": Case(scale_div_pow),
    "scale_div_math_sqrt": Case(scale_div_math_sqrt),
    "scale_div_full": Case(scale_div_full),
    "scale_on_q": Case(scale_on_q),
    "scale_on_k": Case(scale_on_k),
    "scale_on_kt": Case(scale_on_kt),
    "scale_split": Case(scale_split),
    "matmul_functional": Case(matmul_functional),
    "permute_kt": Case(permute_kt),
    "mt_kt": Case(mt_kt),
    "nn_softmax": Case(nn_softmax),
    "upcast_scores": Case(upcast_scores, SQUARE[2:] + BF16),
    "softmax_dtype_fp32": Case(softmax_dtype_fp32, SQUARE[2:] + BF16),
    "type_as_probs": Case(type_as_probs, BF16),
    "hf_eager": Case(hf_eager, GQA, additive_mask, {"mask": "additive"}),
    "additive_mask": Case(add_mask, SQUARE + CROSS, additive_mask, {"mask": "additive"}),
    "additive_mask_2d": Case(add_mask, SQUARE, additive_mask_2d, {"mask": "additive"}),
    "masked_fill_not": Case(masked_fill_not, SQUARE[2:] + CROSS, bool_mask, {"mask": "boolean"}),
    "masked_fill_eq0": Case(masked_fill_eq0, SQUARE[2:], int_mask, {"mask": "boolean"}),
    "where_neg_inf": Case(where_neg_inf, SQUARE[2:], bool_mask, {"mask": "boolean"}),
    "where_finfo_min": Case(where_finfo_min, SQUARE[2:], bool_mask, {"mask": "boolean"}),
    "where_bool_cast": Case(where_bool_cast, SQUARE[2:], float01_mask, {"mask": "boolean"}),
    "key_padding": Case(masked_fill_not, SQUARE + CROSS, padding_mask, {"mask": "key_padding"}),
    "bert_extended_mask": Case(bert_extended_mask, SQUARE, attention_mask_2d, {"mask": "additive"}),
    "causal_tril_bool": Case(causal_tril_bool, SQUARE, expect=CAUSAL),
    "causal_triu_bool": Case(causal_triu_bool, SQUARE, expect=CAUSAL),
    "causal_tril_eq0": Case(causal_tril_eq0, SQUARE, expect=CAUSAL),
    "causal_triu_additive": Case(causal_triu_additive, SQUARE, expect=CAUSAL),
    "causal_where_additive": Case(causal_where_additive, SQUARE, expect=CAUSAL),
    "sliding_window_additive": Case(sliding_window_additive, SQUARE, expect={"causal": True, "window": WINDOW}),
    "causal_arange_where": Case(causal_arange_where, SQUARE + CROSS, expect=CAUSAL),
    "causal_arange_masked": Case(causal_arange_masked, SQUARE, expect=CAUSAL),
    "causal_bottom_right": Case(causal_bottom_right, DECODE, expect={"causal": True, "align": "bottom_right"}),
    "sliding_window": Case(sliding_window, SQUARE, expect={"causal": True, "window": WINDOW}),
    "sliding_window_bottom_right": Case(
        sliding_window_bottom_right, DECODE, expect={"causal": True, "align": "bottom_right", "window": WINDOW}
    ),
    "causal_twice": Case(causal_twice, DECODE, expect=CAUSAL),
    "window_only": Case(window_only, SQUARE, expect={"window": WINDOW}),
    "causal_and_padding": Case(causal_and_padding, SQUARE, padding_mask, {"causal": True, "mask": "key_padding"}),
    "softcap_div": Case(softcap_div, expect={"softcap": SOFTCAP}),
    "softcap_gemma2": Case(softcap_gemma2, expect={"softcap": SOFTCAP}),
    "gqa_repeat_kv": Case(gqa_repeat_kv, GQA),
    "gqa_repeat_interleave": Case(gqa_repeat_interleave, GQA),
    "mqa_expand": Case(mqa_expand, MQA),
    "cross_attention": Case(scale_mul, CROSS),
    "bmm_3d": Case(bmm_3d, SQUARE + CROSS[:1], three_d=True),
    "baddbmm_bias": Case(baddbmm_bias, SQUARE[2:] + CROSS[:1], bias_3d, {"mask": "additive"}, three_d=True),
    "dropout_eval_functional": Case(dropout_eval, SQUARE[2:]),
    "dropout_eval_module": Case(dropout_eval, SQUARE[2:], module=DropoutModule),
    "sdpa": Case(sdpa, SQUARE[2:] + CROSS[:1], expect=SDPA_SOURCE),
    "sdpa_causal": Case(sdpa_causal, SQUARE + CROSS, expect={**SDPA_SOURCE, **CAUSAL}),
    "sdpa_bool_mask": Case(sdpa_mask, SQUARE[2:] + CROSS[:1], bool_mask, {**SDPA_SOURCE, "mask": "boolean"}),
    "sdpa_float_mask": Case(sdpa_mask, SQUARE[2:] + CROSS[:1], additive_mask, {**SDPA_SOURCE, "mask": "additive"}),
    "sdpa_padding_mask": Case(sdpa_mask, SQUARE[2:], padding_mask, {**SDPA_SOURCE, "mask": "key_padding"}),
    "sdpa_scale": Case(sdpa_scale, SQUARE[2:], expect={**SDPA_SOURCE, "scale": 0.3}),
    "sdpa_enable_gqa": Case(sdpa_enable_gqa, GQA, expect=SDPA_SOURCE),
    "sdpa_repeat_kv": Case(sdpa_repeat_kv, GQA[:2], expect={**SDPA_SOURCE, **CAUSAL}),
}


def default_expect(case: Case, shape: Shape) -> dict[str, Any]:
    """Spec fields every case must give unless it says otherwise."""
    batch, q_heads, kv_heads = (B * H, 1, 1) if case.three_d else (B, H, shape.kv_heads)
    return {
        "batch": batch,
        "q_heads": q_heads,
        "kv_heads": kv_heads,
        "q_len": shape.nq,
        "kv_len": shape.nk,
        "head_dim": shape.d,
        "v_head_dim": shape.d,
        "dtype": str(shape.dtype).removeprefix("torch."),
        "scale": shape.d**-0.5,
        "causal": False,
        "align": "top_left",
        "window": None,
        "softcap": None,
        "mask": "none",
        "gqa_group": q_heads // kv_heads,
        "dropout_p": 0.0,
        "rope": None,
        "source": "matmul",
    }
