"""Differential fuzzing: random attention / norm / RoPE graphs compiled with tilefuse (strict) against eager.

Hypothesis draws how a model spells each op, the memory layout of every operand, dtypes, masks of every dtype and
broadcast shape, learned biases, scales including 0 and negative, GQA and odd sizes. Each graph is compiled with
`backend=tilefuse, strict=True` and its outputs and every input's gradient are held to the numerics protocol of the
GPU tests (tests/gpu/_numerics.py): err(ours) <= 2·err(eager) + floor forward, 3x backward, against an fp64 golden.

CI runs a small fixed sample (derandomized);
`TILEFUSE_FUZZ_EXAMPLES=500 pytest tests/compiler/test_fuzz_differential.py` runs a longer, random search.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _numerics import GRADIENT_FACTOR, as_fp64, assert_finite, check_against_golden, max_err, rounding_floor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tilefuse.compiler.backend import TilefuseBackend
from tilefuse.compiler.options import Options

EXAMPLES = int(os.environ.get("TILEFUSE_FUZZ_EXAMPLES", "12"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="TILEFUSE_FUZZ_EXAMPLES" not in os.environ,
    # every example compiles a graph: shrinking a failure would take minutes, so only the long profile shrinks
    phases=list(Phase) if "TILEFUSE_FUZZ_EXAMPLES" in os.environ else [Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _compiled(module: nn.Module) -> tuple[Any, TilefuseBackend]:
    torch._dynamo.reset()
    backend = TilefuseBackend(Options(strict=True, inner="eager"))
    return torch.compile(module, backend=backend), backend


def _layout(t: Tensor, layout: str) -> Tensor:
    """The same values as `t` ([B, H, N, D]) in another memory layout."""
    if layout == "bnhd":  # a model that projects to [B, N, H, D] and transposes
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "last_strided":  # a model that keeps the transpose (Vᵀ) and passes it back transposed
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # a view into a wider buffer (fused QKV projections)
        wide = torch.cat([t, torch.zeros_like(t)], dim=-1)
        return wide[..., : t.shape[-1]]
    return t.contiguous()


# ------------------------------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class AttentionCase:
    batch: int
    kv_heads: int
    group: int
    q_len: int
    kv_len: int
    head_dim: int
    spelling: str
    layouts: tuple[str, str, str]
    scale: float | None
    mask: str
    mask_shape: tuple[int, ...]
    causal: bool
    dtype: torch.dtype


@st.composite
def attention_cases(draw: Any) -> AttentionCase:
    batch, kv_heads, group = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    q_len = draw(st.sampled_from([1, 5, 17]))
    causal = draw(st.booleans())
    kv_len = q_len if causal else draw(st.sampled_from([q_len, 3, 19]))
    mask = "none" if causal else draw(st.sampled_from(["none", "bool", "additive", "learned"]))
    heads = kv_heads * group
    dims = [batch, heads, q_len, kv_len]
    shape = tuple(draw(st.sampled_from([d, 1])) if i < 3 else d for i, d in enumerate(dims))
    rank = draw(st.sampled_from([2, 3, 4])) if shape[0] == 1 else 4
    return AttentionCase(
        batch, kv_heads, group, q_len, kv_len,
        head_dim=draw(st.sampled_from([8, 12])),
        spelling=draw(st.sampled_from(["sdpa", "matmul", "manual_softmax"])),
        layouts=tuple(draw(st.sampled_from(["contiguous", "bnhd", "last_strided", "sliced"])) for _ in range(3)),  # type: ignore[arg-type]
        scale=draw(st.sampled_from([None, 0.0, -0.4, 1e-4, 0.7])),
        mask=mask, mask_shape=shape[4 - rank :], causal=causal,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
    )  # fmt: skip


class FuzzAttention(nn.Module):
    """Attention as the case spells it; a learned bias is a parameter, other masks are inputs."""

    def __init__(self, case: AttentionCase) -> None:
        super().__init__()
        self.case = case
        if case.mask == "learned":
            self.bias = nn.Parameter(torch.randn(case.mask_shape) * 0.5)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        case = self.case
        mask = self.bias.to(q.dtype) if case.mask == "learned" else mask
        if case.spelling == "sdpa":
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=case.causal, scale=case.scale, enable_gqa=case.group > 1
            )
        k, v = (t.repeat_interleave(case.group, dim=1) for t in (k, v))
        scale = 1.0 / math.sqrt(q.shape[-1]) if case.scale is None else case.scale
        scores = (q @ k.transpose(-1, -2)) * scale
        if case.causal:
            keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        if case.spelling == "manual_softmax":
            shifted = scores.float() - scores.float().amax(dim=-1, keepdim=True)
            probs = (shifted.exp() / shifted.exp().sum(dim=-1, keepdim=True)).to(q.dtype)
        else:
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v


def _attention_inputs(case: AttentionCase, gen: torch.Generator) -> tuple[list[Tensor], Tensor | None]:
    heads = case.kv_heads * case.group
    shapes = [
        (case.batch, heads, case.q_len, case.head_dim),
        (case.batch, case.kv_heads, case.kv_len, case.head_dim),
        (case.batch, case.kv_heads, case.kv_len, case.head_dim),
    ]
    qkv = [
        _layout(torch.randn(s, generator=gen).to(case.dtype), lay) for s, lay in zip(shapes, case.layouts, strict=True)
    ]
    mask = None
    if case.mask == "bool":
        mask = torch.rand(case.mask_shape, generator=gen) > 0.4
        mask[..., 0] = True  # no fully masked row: eager gives NaN there, tilefuse zeros (documented)
    elif case.mask == "additive":
        mask = (torch.randn(case.mask_shape, generator=gen) * 2).to(case.dtype)
    return qkv, mask


@pytest.mark.slow
@FUZZ
@given(case=attention_cases())
def test_random_attention_graphs_match_eager(case: AttentionCase) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = FuzzAttention(case).to(case.dtype if case.mask == "learned" else torch.float32)
    qkv, mask = _attention_inputs(case, gen)
    compiled, backend = _compiled(module)
    kwargs = {} if mask is None else {"mask": mask}
    params = [module.bias] if case.mask == "learned" else []
    _check(compiled, module, qkv, kwargs, params, ("out",), ("q", "k", "v"))
    assert backend.report.by_kind("attention"), f"no attention site seen for {case}"


def _check(compiled: Any, module: nn.Module, inputs: list[Tensor], kwargs: dict[str, Any], params: list[Tensor],
           out_names: tuple[str, ...], in_names: tuple[str, ...]) -> None:  # fmt: skip
    """The numerics protocol on the inputs, then on the gradients of the module's parameters (ours, eager, and an
    fp64 golden from an fp64 copy of the module)."""
    check_against_golden(compiled, module, inputs, kwargs, (out_names, in_names))
    if not params:
        return
    golden_module = copy.deepcopy(module).double()
    runs = (("ours", compiled, module, inputs, kwargs), ("eager", module, module, inputs, kwargs),
            ("golden", golden_module, golden_module, as_fp64(inputs), as_fp64(kwargs)))  # fmt: skip
    grads: dict[str, list[Tensor | None]] = {}
    for label, fn, owner, args, kw in runs:
        owner.zero_grad(set_to_none=True)
        fn(*args, **kw).double().square().sum().backward()
        grads[label] = [p.grad for p in owner.parameters()]
    for ours, eager, golden in zip(grads["ours"], grads["eager"], grads["golden"], strict=True):
        if eager is None:
            continue
        assert ours is not None, "a learned parameter of the fused site got no gradient (eager has one)"
        assert golden is not None
        assert_finite(["dparam"], [ours])
        # the parameter is cast to the inputs' dtype before use, so its gradient has that dtype's precision
        err_ours, err_eager = max_err(ours, golden), max_err(eager, golden)
        floor = rounding_floor(inputs[0].dtype, golden)
        assert err_ours <= GRADIENT_FACTOR * err_eager + floor, f"dparam: {err_ours:.3g} vs eager {err_eager:.3g}"


# ------------------------------------------------------------------------------------------------ norms, RoPE


@dataclass(frozen=True)
class NormCase:
    spelling: str
    layout: str
    width: int
    eps: float
    residual: bool
    dtype: torch.dtype


@st.composite
def norm_cases(draw: Any) -> NormCase:
    return NormCase(
        spelling=draw(st.sampled_from(["hf_rms", "rms_norm", "layer_norm", "manual_layer_norm"])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        width=draw(st.sampled_from([8, 24, 40])),
        eps=draw(st.sampled_from([1e-6, 1e-5, 1e-12, 0.1])),
        residual=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
    )


class FuzzNorm(nn.Module):
    def __init__(self, case: NormCase) -> None:
        super().__init__()
        self.case = case
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(case.width))
        self.bias = nn.Parameter(0.1 * torch.randn(case.width))

    def forward(self, x: Tensor, r: Tensor | None = None) -> Tensor:
        case, w = self.case, self.weight.to(x.dtype)
        if r is not None:
            x = x + r
        if case.spelling == "hf_rms":
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + case.eps)).to(x.dtype)
        if case.spelling == "rms_norm":
            return F.rms_norm(x, (case.width,), w, case.eps)
        if case.spelling == "layer_norm":
            return F.layer_norm(x, (case.width,), w, self.bias.to(x.dtype), case.eps)
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        return ((xf - mean) / torch.sqrt(var + case.eps)).to(x.dtype) * w + self.bias.to(x.dtype)


def _norm_input(case: NormCase, gen: torch.Generator) -> Tensor:
    x = torch.randn(3, 5, case.width, generator=gen).to(case.dtype)
    if case.layout == "transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if case.layout == "sliced":
        return torch.cat([x, x], dim=-1)[..., : case.width]
    return x


@pytest.mark.slow
@FUZZ
@given(case=norm_cases())
def test_random_norm_graphs_match_eager(case: NormCase) -> None:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    module = FuzzNorm(case)
    inputs = [_norm_input(case, gen), _norm_input(case, gen)][: 2 if case.residual else 1]
    compiled, backend = _compiled(module)
    _check(compiled, module, inputs, {}, [module.weight], ("out",), ("x", "r")[: len(inputs)])
    assert backend.report.sites, f"no norm site seen for {case}"


@dataclass(frozen=True)
class RopeCase:
    layout: str
    cos_layout: str
    head_dim: int
    spelling: str
    dtype: torch.dtype


@st.composite
def rope_cases(draw: Any) -> RopeCase:
    return RopeCase(
        layout=draw(st.sampled_from(["contiguous", "bnhd", "last_strided"])),
        cos_layout=draw(st.sampled_from(["nd", "b1nd", "expanded"])),
        head_dim=draw(st.sampled_from([8, 16])),
        spelling=draw(st.sampled_from(["rotate_half", "interleaved"])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
    )


def _rotate(x: Tensor, spelling: str) -> Tensor:
    if spelling == "rotate_half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class FuzzRopeAttention(nn.Module):
    def __init__(self, case: RopeCase) -> None:
        super().__init__()
        self.case = case

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        spelling = self.case.spelling
        q = q * cos + _rotate(q, spelling) * sin
        k = k * cos + _rotate(k, spelling) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _cos_sin(case: RopeCase, n: int) -> tuple[Tensor, Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, case.head_dim, 2).float() / case.head_dim))
    angles = torch.arange(n).float()[:, None] * inv[None]
    if case.spelling == "rotate_half":
        angles = torch.cat([angles, angles], dim=-1)
    else:
        angles = angles.repeat_interleave(2, dim=-1)
    cos, sin = angles.cos().to(case.dtype), angles.sin().to(case.dtype)
    if case.cos_layout == "b1nd":
        return cos[None, None], sin[None, None]
    if case.cos_layout == "expanded":
        return cos[None, None].expand(2, 1, n, -1), sin[None, None].expand(2, 1, n, -1)
    return cos, sin


@pytest.mark.slow
@FUZZ
@given(case=rope_cases())
def test_random_rope_attention_graphs_match_eager(case: RopeCase) -> None:
    gen = torch.Generator().manual_seed(2)
    shape = (2, 2, 9, case.head_dim)
    qkv = [_layout(torch.randn(shape, generator=gen).to(case.dtype), case.layout) for _ in range(3)]
    cos, sin = _cos_sin(case, shape[2])
    module = FuzzRopeAttention(case)
    compiled, backend = _compiled(module)
    _check(compiled, module, qkv, {"cos": cos, "sin": sin}, [], ("out",), ("q", "k", "v"))
    assert backend.report.by_kind("attention"), f"no attention site seen for {case}"
