"""RoPE as each library writes it: diffusers (real/complex `apply_rotary_emb`, Flux's multi-axis tables, LTX on the
hidden width, HiDream/Kandinsky 2×2 tables), torchtune (its RoPE modules, seq before heads, fp32 then `type_as`),
x-transformers (einops rotate-half, partial rotary, xpos scale), litgpt, per-head tables; and look-alikes that are
no rotation (partner terms of one sign, pairs that are not partners, tables swapped in one half, a stack of another
tensor). Where the library installs here its own function or module is used."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _corpus import Spelling
from torch import Tensor, nn

from tilefuse.benchmarks.harness import perturbed

B, S, H, D = 2, 5, 2, 8


def _angles(seq: int, half: int, seed: int = 0) -> Tensor:
    return torch.randn(seq, half, generator=torch.Generator().manual_seed(seed))


class _Project(nn.Module):
    """x = proj(h) viewed as [B, S, H, D] (seq before heads) or transposed to [B, H, S, D]; then `rope(x)`."""

    def __init__(self, rope: Callable[..., Tensor], heads_first: bool = False, width: int = H * D) -> None:
        super().__init__()
        self.proj, self.rope, self.heads_first = nn.Linear(16, width), rope, heads_first

    def forward(self, h: Tensor, *tables: Tensor) -> Tensor:
        x = self.proj(h).view(B, S, H, -1)
        return self.rope(x.transpose(1, 2) if self.heads_first else x, *tables)


def _entry(name: str, source: str, rope: Callable[..., Tensor], tables: tuple[Tensor, ...], **kw: Any) -> Spelling:
    heads_first = kw.pop("heads_first", False)

    def build() -> tuple[Any, tuple[Any, ...]]:
        h = torch.randn(B, S, 16, generator=torch.Generator().manual_seed(3))
        return perturbed(_Project(rope, heads_first)), (h, *tables)

    return Spelling(name, source, build, **kw)


def _layout(layout: str, source: str | None = None) -> Callable[[dict[str, list[Any]]], None]:
    def check(specs: dict[str, list[Any]]) -> None:
        assert {s.layout for s in specs["rope"]} == {layout}, specs["rope"]
        if source is not None:
            assert {s.source for s in specs["rope"]} == {source}, specs["rope"]

    return check


# ---------------------------------------------------------------------------------------------- diffusers
def _pairs(a: Tensor) -> tuple[Tensor, Tensor]:
    """diffusers' get_1d_rotary_pos_embed(use_real=True, repeat_interleave_real=True): [S, D] tables."""
    return a.repeat_interleave(2, -1).cos(), a.repeat_interleave(2, -1).sin()


def _halves(a: Tensor) -> tuple[Tensor, Tensor]:
    return torch.cat([a, a], -1).cos(), torch.cat([a, a], -1).sin()


def _diffusers_real(unbind_dim: int) -> Callable[..., Tensor]:
    def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        return apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=unbind_dim, sequence_dim=1)

    return rope


def _diffusers_complex(x: Tensor, freqs_cis: Tensor) -> Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, freqs_cis, use_real=False)  # Lumina: [B, S, H, D], freqs [B, S, D/2] complex


def _flux_multi_axis(x: Tensor, ids: Tensor) -> Tensor:
    """Flux's FluxPosEmbed: one table per position axis (ids [S, 3]), concatenated on the feature axis, computed in
    the graph, then diffusers' apply_rotary_emb on [B, S, H, D]."""
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = [], []
    for axis, dim in enumerate((2, 2, 4)):
        inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = torch.outer(ids[:, axis], inv).repeat_interleave(2, -1)
        cos.append(freqs.cos())
        sin.append(freqs.sin())
    return apply_rotary_emb(x, (torch.cat(cos, -1), torch.cat(sin, -1)), sequence_dim=1)


def _ltx(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """diffusers transformer_ltx `apply_rotary_emb`: interleaved pairs over the whole hidden width [B, S, C]."""
    x = x.flatten(2)
    x_real, x_imag = x.unflatten(2, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(2)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _matrix(a: Tensor) -> Tensor:
    """[1, S, 1, D/2, 2, 2]: each pair's rotation matrix [[cos, -sin], [sin, cos]]."""
    c, s = a.cos(), a.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)[None, :, None]


def _hidream(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """diffusers transformer_hidream_image `apply_rope`: a 2×2 matrix per pair."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _kandinsky(x: Tensor, rope: Tensor) -> Tensor:
    """diffusers transformer_kandinsky6 `apply_rotary`: the same matrix, applied by a sum over the pair axis."""
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2).float()
    return (rope.float() * x_).sum(dim=-1).reshape(*x.shape).to(dtype=x.dtype)


def _wan(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """diffusers transformer_wan: the rotated halves written in place into an empty buffer through step-2 slices
    (canonicalized to their interleaving stack)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


# ---------------------------------------------------------------------------------------------- torchtune
class _TorchtuneAttention(nn.Module):
    """torchtune's MultiHeadAttention core: q, k [b, s, n_h, h_d] rotated by `pos`, then transposed for SDPA."""

    def __init__(self, pos: nn.Module) -> None:
        super().__init__()
        self.q, self.k, self.v, self.pos = nn.Linear(16, H * D), nn.Linear(16, H * D), nn.Linear(16, H * D), pos

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = (p(h).view(B, S, H, D) for p in (self.q, self.k, self.v))
        q, k = self.pos(q), self.pos(k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2).reshape(B, S, H * D)


def _torchtune(module: str, cls: str, absorbed_layout: str) -> Spelling:
    def build() -> tuple[Any, tuple[Any, ...]]:
        import importlib

        pos = getattr(importlib.import_module(module), cls)(D, max_seq_len=16)
        h = torch.randn(B, S, 16, generator=torch.Generator().manual_seed(3))
        return perturbed(_TorchtuneAttention(pos)), (h,)

    def check(specs: dict[str, list[Any]]) -> None:
        (attn,) = specs["attention"]
        assert attn.rope is not None and attn.rope.layout == absorbed_layout, attn  # RoPE inside attention

    return Spelling(f"{cls}_in_attention", "torchtune", build, {"attention": 1, "rope": 2}, check_specs=check)


def _torchtune_bf16() -> Spelling:
    """fp32 computation cast back with `type_as(x)`: the op computes in fp32 too, so bf16 outputs are eager's."""

    def build() -> tuple[Any, tuple[Any, ...]]:
        from torchtune.modules.position_embeddings import RotaryPositionalEmbeddings

        x = torch.randn(B, S, H, D, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        return RotaryPositionalEmbeddings(D, max_seq_len=16), (x,)

    return Spelling("rope_bf16", "torchtune", build, {"rope": 1}, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ x-transformers
def _x_transformers(x: Tensor, freqs: Tensor, scale: Tensor) -> Tensor:
    """apply_rotary_pos_emb with partial rotary (6 of 8 features) and the xpos scale."""
    from x_transformers.x_transformers import apply_rotary_pos_emb

    return apply_rotary_pos_emb(x, freqs, scale)


def _x_transformers_per_head(x: Tensor, freqs: Tensor) -> Tensor:
    """freqs with a heads axis [B, H, S, D] (learned or per-head frequencies)."""
    from x_transformers.x_transformers import apply_rotary_pos_emb

    return apply_rotary_pos_emb(x, freqs)


# ---------------------------------------------------------------------------------------------------- litgpt
def _litgpt(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """litgpt `apply_rope`: halves, cat((-x2, x1)), cos/sin [B, S, D] gaining the heads axis."""
    head_size = x.size(-1)
    x1, x2 = x[..., : head_size // 2], x[..., head_size // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    roped = (x * cos) + (rotated * sin)
    return roped.to(dtype=x.dtype)


# ------------------------------------------------------------------------------------------ per-head tables
def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


class _PerHeadAttention(nn.Module):
    """Frequencies learned per head: cos/sin [1, H, S, D]; q and k rotated, then SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 3 * H * D)
        angles = torch.randn(1, H, S, D // 2, generator=torch.Generator().manual_seed(5)).repeat(1, 1, 1, 2)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self.qkv(h).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k = (t * self.cos + _rotate_half(t) * self.sin for t in (q, k))
        return F.scaled_dot_product_attention(q, k, v)


def _absorbed(specs: dict[str, list[Any]]) -> None:
    (attn,) = specs["attention"]
    assert attn.rope is not None, attn


_H = torch.randn(B, S, 16, generator=torch.Generator().manual_seed(3))


class _NormedRope(nn.Module):
    """Flux / Wan / Qwen3: RMSNorm on q (its weight a table too), then RoPE: the weight stays the norm's."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.weight = nn.Linear(16, H * D), nn.Parameter(torch.ones(D))
        angles = _angles(S, D // 2).repeat(1, 2)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, h: Tensor) -> Tensor:
        q = self.proj(h).view(B, S, H, D).transpose(1, 2)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return q * self.cos + _rotate_half(q) * self.sin


# ----------------------------------------------------------------------------------------------- look-alikes
def _same_sign(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """[[c, -s], [-s, c]]: the partner terms have one sign — not a rotation."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos - x1 * sin), -1)


def _not_partners(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Each feature mixed with its neighbour by a roll: (i, i+1) is not an involution."""
    return x * cos + torch.cat((-x[..., 1:], x[..., :1]), -1) * sin


def _half_swapped(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """cos and sin swapped in the second half only."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * sin + x1 * cos), -1)


def _unrelated_stack(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """A stack of (-y_odd, y_even) of another tensor y (here x squared): no linear map of x."""
    y = x * x
    return x * cos + torch.stack((-y[..., 1::2], y[..., 0::2]), -1).flatten(-2) * sin


def _fully_swapped(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x·sin + R(x)·cos is still a rotation (by π/2 − θ): fused with the tables as written."""
    x1, x2 = x.chunk(2, -1)
    return x * sin + torch.cat((-x2, x1), -1) * cos


_A = _angles(S, D // 2)
_XT_FREQS = torch.randn(1, S, 6, generator=torch.Generator().manual_seed(6))
_XT_SCALE = torch.rand(1, S, 6, generator=torch.Generator().manual_seed(7)) + 0.5
_LITGPT = torch.randn(B, S, D // 2, generator=torch.Generator().manual_seed(8)).repeat(1, 1, 2)

SPELLINGS = [
    _entry("apply_rotary_emb_unbind_pairs", "diffusers", _diffusers_real(-1), _pairs(_A), fused={"rope": 1},
           check_specs=_layout("interleaved")),
    _entry("apply_rotary_emb_unbind_halves", "diffusers", _diffusers_real(-2), _halves(_A), fused={"rope": 1},
           check_specs=_layout("rotate_half")),
    _entry("apply_rotary_emb_complex", "diffusers", _diffusers_complex, (torch.polar(torch.ones(S, D // 2), _A)[None],),
           fused={"rope": 1}, check_specs=_layout("interleaved", "complex")),
    _entry("flux_multi_axis_tables", "diffusers", _flux_multi_axis,
           (torch.stack([torch.zeros(S), torch.arange(S) // 2, torch.arange(S) % 2], -1).float(),), fused={"rope": 1},
           check_specs=_layout("interleaved")),
    _entry("ltx_hidden_width", "diffusers", _ltx, _pairs(_angles(S, H * D // 2))[:2], fused={"rope": 1},
           check_specs=_layout("interleaved")),
    _entry("hidream_matrix_table", "diffusers", _hidream, (_matrix(_A),), fused={"rope": 1},
           check_specs=_layout("interleaved", "matrix")),
    _entry("kandinsky_matrix_sum", "diffusers", _kandinsky, (_matrix(_A),), fused={"rope": 1},
           check_specs=_layout("interleaved", "matrix")),
    _entry("wan_written_in_place", "diffusers", _wan, tuple(t[None, :, None] for t in _pairs(_A)), fused={"rope": 1},
           check_specs=_layout("interleaved")),
    _torchtune("torchtune.modules.position_embeddings", "RotaryPositionalEmbeddings", "interleaved"),
    _torchtune("torchtune.models.llama3_1._position_embeddings", "Llama3ScaledRoPE", "interleaved"),
    _torchtune("torchtune.models.phi3._position_embeddings", "Phi3RotaryPositionalEmbeddings", "rotate_half"),
    _torchtune("torchtune.models.qwen2._positional_embeddings", "Qwen2RotaryPositionalEmbeddings", "rotate_half"),
    _torchtune_bf16(),
    _entry("apply_rotary_pos_emb_partial_xpos", "x-transformers", _x_transformers, (_XT_FREQS, _XT_SCALE),
           heads_first=True, fused={"rope": 1}, check_specs=_layout("interleaved")),
    _entry("apply_rotary_pos_emb_per_head_freqs", "x-transformers", _x_transformers_per_head,
           (torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(9)),), heads_first=True,
           fused={"rope": 1}, check_specs=_layout("interleaved")),
    _entry("apply_rope", "litgpt", _litgpt, (_LITGPT.cos(), _LITGPT.sin()), heads_first=True, fused={"rope": 1},
           check_specs=_layout("rotate_half")),
    Spelling("per_head_tables_in_attention", "hand", lambda: (perturbed(_PerHeadAttention()), (_H,)),
             {"attention": 1, "rope": 2}, check_specs=_absorbed),
    Spelling("rmsnorm_then_rope", "hand", lambda: (perturbed(_NormedRope()), (_H,)), {"rmsnorm": 1, "rope": 1}),
    _entry("tables_swapped_everywhere", "hand", _fully_swapped, (_A.cos()[None, None].repeat(1, 1, 1, 2),
           _A.sin()[None, None].repeat(1, 1, 1, 2)), heads_first=True, fused={"rope": 1}),
    _entry("same_sign_partners", "hand", _same_sign, (_A.cos(), _A.sin()), heads_first=True,
           declined={"rope": 1}, train=False),
    _entry("roll_not_partners", "hand", _not_partners, _halves(_A), heads_first=True, declined={"rope": 1},
           train=False),
    _entry("tables_swapped_in_one_half", "hand", _half_swapped, (_A.cos(), _A.sin()), heads_first=True,
           declined={"rope": 1}, train=False),
    _entry("stack_of_another_tensor", "hand", _unrelated_stack, _halves(_A), heads_first=True, declined={"rope": 0},
           train=False),
]  # fmt: skip
