"""Attention as libraries write its two contractions: Q·Kᵀ and P·V as matmul, bmm, baddbmm (diffusers' classic
processor: an ignored `torch.empty` input with beta=0, or a bias with beta=1) or einsum (x-transformers, with one
key/value head and no heads axis, sequence-major, operands swapped), heads folded into the batch or not; timm's
and litgpt's spellings, and the real diffusers / x-transformers / torchtune modules, which install here.

Negatives are softmaxes that are not one softmax attention: over the query axis, probabilities contracted over
the wrong axis, talking heads and top-k sparse attention (weights that depend on other scores), a mixture-of-
experts router. Sigmoid attention has no softmax, so no site at all.
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

B, H, N, D = 2, 4, 6, 8
TEXT = 5
C = H * D
FROM_SCORES = "computed from the scores themselves"
Build = Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _qkv(kv_heads: int = H) -> tuple[Tensor, Tensor, Tensor]:
    return _randn(B, H, N, D), _randn(B, kv_heads, N, D, seed=1), _randn(B, kv_heads, N, D, seed=2)


def _field(name: str, value: Any) -> Callable[[dict[str, list[Any]]], None]:
    def check(specs: dict[str, list[Any]]) -> None:
        assert [getattr(s, name) for s in specs["attention"]] == [value]

    return check


def _functional(fn: Callable[..., Tensor], *inputs: Tensor) -> Build:
    return lambda: (fn, inputs)


def _module(make: Callable[[], nn.Module], *shapes: tuple[int, ...]) -> Build:
    return lambda: (perturbed(make()), tuple(_randn(*s, seed=i) for i, s in enumerate(shapes)))


# ------------------------------------------------------------------------------------------------- diffusers
class ClassicProcessor(nn.Module):
    """diffusers' AttnProcessor: heads folded into the batch ([B*H, N, D]), baddbmm(empty, q, kᵀ, beta=0,
    alpha=scale) (torch ignores the input: diffusers passes torch.empty), softmax in fp32, cast back, bmm, heads
    unfolded, out projection, residual and rescale."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(C, C) for _ in range(4))

    def _to_batch(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, H, D).permute(0, 2, 1, 3).reshape(b * H, n, D)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (self._to_batch(f(x)) for f in (self.to_q, self.to_k, self.to_v))
        empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype)
        scores = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=D**-0.5)
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        out = torch.bmm(probs, v)
        out = out.reshape(-1, H, N, D).permute(0, 2, 1, 3).reshape(-1, N, C)
        return (self.to_out(out) + x) / 1.5


def _diffusers_attention(processor: str, **kwargs: Any) -> nn.Module:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    procs = {"classic": AttnProcessor, "sdpa": AttnProcessor2_0}
    return Attention(query_dim=C, heads=H, dim_head=D, bias=True, processor=procs[processor](), **kwargs)


class DiffusersCross(nn.Module):
    """The real `Attention` as a UNet's cross-attention: text states of another length and width, upcasts, and
    the text padding as UNet2DCondition passes it ((1 - keep) · -10000, [B, 1, S]; the classic processor repeats
    it per head and hands it to baddbmm with beta=1)."""

    def __init__(self, processor: str) -> None:
        super().__init__()
        self.attn = _diffusers_attention(processor, cross_attention_dim=12, upcast_attention=True, upcast_softmax=True)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        keep = torch.ones(B, TEXT)
        keep[1, -2:] = 0
        return self.attn(x, encoder_hidden_states=text, attention_mask=((1 - keep) * -10000.0)[:, None, :])


class DiffusersSpatial(nn.Module):
    """The real `Attention` as a VAE mid-block's: [B, C, h, w] input, group norm, residual, output rescale."""

    def __init__(self, processor: str) -> None:
        super().__init__()
        self.attn = _diffusers_attention(
            processor, norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0, eps=1e-6
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x)


def _diffusers() -> list[Spelling]:
    one = {"attention": 1}
    cross = {name: _module(lambda p=name: DiffusersCross(p), (B, N, C), (B, TEXT, 12)) for name in ("classic", "sdpa")}
    return [
        Spelling("attn_processor_baddbmm_beta0", "diffusers", _module(ClassicProcessor, (B, N, C)), one),
        Spelling(
            "Attention_classic_spatial", "diffusers", _module(lambda: DiffusersSpatial("classic"), (B, C, 2, 3)), one
        ),
        Spelling("Attention_classic_cross_masked", "diffusers", cross["classic"], one),
        Spelling("Attention_sdpa_cross_masked", "diffusers", cross["sdpa"], one),
    ]


# -------------------------------------------------------------------------------------------- x-transformers
def xt_einsum_mqa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attend with one key/value head, dropped from K and V: `b h i d, b j d -> b h i j` on both sides of a
    softmax taken in fp32, causal mask of -finfo.max."""
    k, v = k[:, 0], v[:, 0]
    sim = torch.einsum("b h i d, b j d -> b h i j", q, k) * q.shape[-1] ** -0.5
    causal = torch.ones(N, N, dtype=torch.bool).triu(1)
    sim = sim.masked_fill(causal, -torch.finfo(sim.dtype).max)
    attn = sim.softmax(dim=-1, dtype=torch.float32).type(sim.dtype)
    return torch.einsum("b h i j, b j d -> b h i d", attn, v)


class XAttend(nn.Module):
    """x-transformers' real `Attend` (flash=False), returning only its output."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        from x_transformers.attend import Attend

        self.attend = Attend(**options)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attend(q, k, v)[0]


class XAttention(nn.Module):
    """x-transformers' real `Attention` layer with one key/value head (`attn_one_kv_head`), causal."""

    def __init__(self) -> None:
        super().__init__()
        from x_transformers.x_transformers import Attention

        self.attn = Attention(dim=C, heads=H, dim_head=D, causal=True, one_kv_head=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x)


def _xattend(**options: Any) -> Build:
    return lambda: (XAttend(heads=H, **options), _qkv())


def _x_transformers() -> list[Spelling]:
    one, no = {"attention": 1}, {"attention": 1}
    return [
        Spelling("einsum_mqa_no_heads_axis", "x-transformers", _functional(xt_einsum_mqa, *_qkv(1)), one),
        Spelling(
            "Attend_softclamp",
            "x-transformers",
            _xattend(softclamp_logits=True, logit_softclamp_value=30.0),
            one,
            check_specs=_field("softcap", 30.0),
        ),
        Spelling("Attend_causal", "x-transformers", _xattend(causal=True), one),
        Spelling("Attention_one_kv_head", "x-transformers", _module(XAttention, (B, N, C)), one),
        Spelling(
            "Attend_qk_norm_scale",
            "x-transformers",
            _xattend(qk_norm=True, scale=10.0),
            one,
            check_specs=_field("scale", 10.0),
        ),
        # not one softmax attention: declined (talking heads, top-k) or no softmax at all (sigmoid)
        Spelling(
            "Attend_pre_talking_heads",
            "x-transformers",
            _xattend(pre_talking_heads=True),
            {},
            no,
            reasons=(FROM_SCORES,),
        ),
        Spelling(
            "Attend_post_talking_heads",
            "x-transformers",
            _xattend(post_talking_heads=True),
            {},
            no,
            reasons=("feeds aten.conv2d",),
        ),
        Spelling("Attend_sparse_topk", "x-transformers", _xattend(sparse_topk=2), {}, no, reasons=(FROM_SCORES,)),
        Spelling("Attend_sigmoid", "x-transformers", _xattend(sigmoid=True), {}, {"attention": 0}),
    ]


# ------------------------------------------------------------------------------- timm, torchtune, litgpt
class TimmAttention(nn.Module):
    """timm's Attention (fused_attn off): qkv projection reshaped and unbound, q scaled before q @ kᵀ."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.scale = D**-0.5

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TorchtuneGQA(nn.Module):
    """torchtune's real MultiHeadAttention: K/V heads repeated by unsqueeze(2).expand(...).flatten(1, 2), SDPA
    with is_causal, its output viewed after a transpose."""

    def __init__(self) -> None:
        super().__init__()
        from torchtune.modules import MultiHeadAttention

        kv = H // 2
        self.attn = MultiHeadAttention(
            embed_dim=C,
            num_heads=H,
            num_kv_heads=kv,
            head_dim=D,
            q_proj=nn.Linear(C, C),
            k_proj=nn.Linear(C, kv * D),
            v_proj=nn.Linear(C, kv * D),
            output_proj=nn.Linear(C, C),
            max_seq_len=N,
            is_causal=True,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x)


def litgpt_manual(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """litgpt's scaled_dot_product_attention without SDPA: scores · 1/√d, causal fill, softmax in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = q @ k.mT * scale
    mask = torch.ones(N, N, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    return torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float).to(dtype=q.dtype) @ v


def litgpt_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(D), is_causal=True)


# -------------------------------------------------------------------------------------------- hand-written
def einsum_sequence_major(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """[B, N, H, D] operands contracted straight into [B, H, Nq, Nk] scores and back to [B, N, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def einsum_operands_swapped(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    scores = torch.einsum("bhjd,bhid->bhij", k, q) * D**-0.5
    return torch.einsum("bhjd,bhij->bhid", v, scores.softmax(-1))


def baddbmm_scaled_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """beta·bias + alpha·q·kᵀ with beta 0.5: the bias enters scaled."""
    q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
    scores = torch.baddbmm(bias, q, k.transpose(-1, -2), beta=0.5, alpha=D**-0.5)
    return torch.bmm(scores.softmax(-1), v)


def baddbmm_beta0_nan_input(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """beta=0: torch ignores the input, NaN and inf in it included (0 · NaN would be NaN)."""
    q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
    nan = torch.full((B * H, N, N), float("nan"))
    return torch.bmm(torch.baddbmm(nan, q, k.transpose(-1, -2), beta=0.0, alpha=D**-0.5).softmax(-1), v)


def softmax_over_queries(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return (q @ k.transpose(-1, -2)).softmax(-2) @ v


def pv_over_query_axis(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Probabilities contracted over the query axis: out[j] = Σ_i p[i, j] v[i]."""
    return torch.einsum("bhij,bhid->bhjd", (q @ k.transpose(-1, -2)).softmax(-1), v)


class Router(nn.Module):
    """A mixture-of-experts router: softmax over expert logits, top-2 weights renormalized."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(C, 4, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        weights, _ = self.gate(x).softmax(dim=-1).topk(2, dim=-1)
        return weights / weights.sum(-1, keepdim=True)


def _others() -> list[Spelling]:
    one, no = {"attention": 1}, {"attention": 1}
    return [
        Spelling("attention", "timm", _module(TimmAttention, (B, N, C)), one),
        Spelling(
            "MultiHeadAttention_gqa",
            "torchtune",
            _module(TorchtuneGQA, (B, N, C)),
            one,
            check_specs=_field("gqa_group", 2),
        ),
        Spelling("manual_causal", "litgpt", _functional(litgpt_manual, *_qkv()), one),
        Spelling("sdpa_scale", "litgpt", _functional(litgpt_sdpa, *_qkv()), one),
        Spelling("einsum_sequence_major", "hand", _functional(einsum_sequence_major, *_qkv()), one),
        Spelling("einsum_operands_swapped", "hand", _functional(einsum_operands_swapped, *_qkv()), one),
        Spelling("baddbmm_beta0_nan_input", "hand", _functional(baddbmm_beta0_nan_input, *_qkv()), one),
        Spelling("baddbmm_beta_half", "hand", _functional(baddbmm_scaled_bias, *_qkv(), _randn(B * H, N, N)), one),
        Spelling(
            "softmax_over_queries",
            "hand",
            _functional(softmax_over_queries, *_qkv()),
            {},
            no,
            reasons=("softmax over dim -2",),
        ),
        Spelling(
            "pv_over_query_axis",
            "hand",
            _functional(pv_over_query_axis, *_qkv()),
            {},
            no,
            reasons=("does not contract their key axis",),
        ),
        Spelling("moe_router", "hand", _module(Router, (B, N, C)), {}, no, reasons=("feeds aten.topk",)),
    ]


SPELLINGS = [*_diffusers(), *_x_transformers(), *_others()]
