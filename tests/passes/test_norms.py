"""NormPass: every RMSNorm/LayerNorm spelling becomes one tilefuse op, residual adds fold in, and the graph
still computes what the module computes; sites that cannot be fused are declined with a reason and left alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    as_double,
    assert_no_worse_than_eager,
    assert_same,
    hf_inputs,
    hf_model,
    ops_in,
    reasons,
    run_pass,
    sites,
    tilefuse_nodes,
)
from torch import Tensor, nn

from tilefuse.passes.base import PassContext
from tilefuse.passes.norms import NormPass

Spelling = Callable[[Any, Tensor], Any]


class Norm(nn.Module):
    """A norm written by `fn(self, x)`, with a weight and a bias to use or ignore."""

    def __init__(self, fn: Spelling, width: int) -> None:
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(width) * 0.5 + 1.0)
        self.bias = nn.Parameter(torch.randn(width) * 0.1)
        self.register_buffer("eps", torch.tensor(1e-6))

    def forward(self, x: Tensor) -> Any:
        return self.fn(self, x)


def _ms(x: Tensor) -> Tensor:
    return x.pow(2).mean(-1, keepdim=True)


def hf_llama_rms(m: Norm, x: Tensor) -> Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return m.weight * h.to(x.dtype)


def t5_rms(m: Norm, x: Tensor) -> Tensor:
    """T5 squares the upcast x but scales x itself."""
    h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + 1e-6)
    if m.weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(m.weight.dtype)
    return m.weight * h


def gemma_rms(m: Norm, x: Tensor) -> Tensor:
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (out * (1.0 + m.weight.float())).type_as(x)


# name -> (spelling, has_weight, weight_offset, eps)
RMS_SPELLINGS: dict[str, tuple[Spelling, bool, float, float]] = {
    "hf_llama": (hf_llama_rms, True, 0.0, 1e-6),
    "t5_scales_uncast_x": (t5_rms, True, 0.0, 1e-6),
    "rsqrt_times_weight": (lambda m, x: x * torch.rsqrt(_ms(x) + 1e-5) * m.weight, True, 0.0, 1e-5),
    "div_sqrt": (lambda m, x: x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + 1e-6) * m.weight, True, 0.0, 1e-6),
    "one_over_sqrt": (
        lambda m, x: m.weight * (x * (1 / torch.sqrt(torch.square(x).mean(-1, keepdim=True) + 1e-6))),
        True,
        0.0,
        1e-6,
    ),
    "eps_first_no_weight": (lambda m, x: x * torch.rsqrt(1e-6 + _ms(x)), False, 0.0, 1e-6),
    "gemma_one_plus_w": (gemma_rms, True, 1.0, 1e-6),
    "functional": (lambda m, x: F.rms_norm(x, (x.shape[-1],), m.weight, 1e-6), True, 0.0, 1e-6),
    "functional_default_eps": (
        lambda m, x: F.rms_norm(x, (x.shape[-1],), m.weight),
        True,
        0.0,
        torch.finfo(torch.float32).eps,
    ),
    "functional_no_weight": (lambda m, x: F.rms_norm(x, (x.shape[-1],), eps=1e-5), False, 0.0, 1e-5),
}


def manual_layer_norm(m: Norm, x: Tensor) -> Tensor:
    d = x - x.mean(-1, keepdim=True)
    return d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-5) * m.weight + m.bias


def var_layer_norm(m: Norm, x: Tensor) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return m.bias + m.weight * ((x - mu) / torch.sqrt(var + 1e-5))


# name -> (spelling, has_weight, has_bias)
LN_SPELLINGS: dict[str, tuple[Spelling, bool, bool]] = {
    "functional": (lambda m, x: F.layer_norm(x, (x.shape[-1],), m.weight, m.bias), True, True),
    "no_affine": (lambda m, x: F.layer_norm(x, (x.shape[-1],)), False, False),
    "weight_only": (lambda m, x: F.layer_norm(x, (x.shape[-1],), m.weight, eps=1e-6), True, False),
    "native": (lambda m, x: torch.native_layer_norm(x, (x.shape[-1],), m.weight, m.bias, 1e-5)[0], True, True),
    "manual_rsqrt": (manual_layer_norm, True, True),
    "manual_var_sqrt": (var_layer_norm, True, True),
}


def _x(width: int, dtype: torch.dtype = torch.float32, rows: int = 5) -> Tensor:
    return (torch.randn(2, rows, width, generator=torch.Generator().manual_seed(1)) * 3 + 0.5).to(dtype)


# ------------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("width", [8, 59])
@pytest.mark.parametrize("spelling", sorted(RMS_SPELLINGS))
def test_rmsnorm_spellings_fuse(spelling: str, width: int) -> None:
    fn, has_weight, offset, eps = RMS_SPELLINGS[spelling]
    module, x = Norm(fn, width), _x(width)
    gm, ctx = run_pass(NormPass(), module, (x,))
    (site,) = ctx.sites
    assert site.status == "fused" and site.kind == "rmsnorm"
    assert (site.spec.has_weight, site.spec.weight_offset, site.spec.width) == (has_weight, offset, width)
    assert site.spec.eps == pytest.approx(eps)
    assert ctx.counters["rmsnorm_fused"] == 1
    assert "tilefuse.rms_norm" in ops_in(gm)
    assert not ops_in(gm) & {"aten.rsqrt", "aten.sqrt", "aten.pow", "aten.mean", "aten.rms_norm"}
    assert tilefuse_nodes(gm, "rms_norm")[0].meta["tilefuse_spec"] == site.spec
    assert_same(gm(x), module(x))


@pytest.mark.parametrize("spelling", ["hf_llama", "t5_scales_uncast_x", "gemma_one_plus_w", "functional"])
def test_rmsnorm_bf16_is_no_worse_than_eager(spelling: str) -> None:
    fn = RMS_SPELLINGS[spelling][0]
    module, x = Norm(fn, 64).to(torch.bfloat16), _x(64, torch.bfloat16)
    gm, ctx = run_pass(NormPass(), module, (x,))
    assert ctx.counters["rmsnorm_fused"] == 1
    ours, eager = gm(x), module(x)
    assert ours.dtype == eager.dtype == torch.bfloat16
    assert_no_worse_than_eager(ours, eager, as_double(module)(x.double()), floor=1e-3)


# --------------------------------------------------------------------------------------- vector-norm statistics
W = 59  # the width of the vector-norm spellings below: their factors are written with it


def _l2(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


# name -> (spelling, eps_mode, norm_scale, eps): eps placed where the spelling puts it, constant factors folded.
VECTOR_NORM_SPELLINGS: dict[str, tuple[Spelling, str, float, float]] = {
    "x_transformers_rms": (lambda m, x: F.normalize(x, dim=-1) * W**0.5 * m.weight, "clamp_norm", 1.0, 1e-12 / W**0.5),
    "l2_qk_norm": (lambda m, x: F.normalize(x, p=2, dim=-1, eps=1e-6), "clamp_norm", W**0.5, 1e-6),
    "rms_plus_eps": (lambda m, x: x / (x.norm(dim=-1, keepdim=True) * W**-0.5 + 1e-4), "add_norm", 1.0, 1e-4),
    "clamp_then_scale": (lambda m, x: x / (_l2(x).clamp_min(1e-3) / 2.0), "clamp_norm", W**0.5 / 2, 5e-4),
    "root_sum_squares": (lambda m, x: x / x.pow(2).sum(-1, keepdim=True).sqrt(), "mean_square", W**0.5, 0.0),
}


@pytest.mark.parametrize("spelling", sorted(VECTOR_NORM_SPELLINGS))
def test_vector_norm_spellings_fuse_with_their_eps_placement(spelling: str) -> None:
    fn, mode, scale, eps = VECTOR_NORM_SPELLINGS[spelling]
    module, x = Norm(fn, W), _x(W)
    x[0, 0] = 0.0  # a zero row: F.normalize's clamp gives 0, not NaN
    gm, ctx = run_pass(NormPass(), module, (x,))
    (site,) = ctx.sites
    assert site.status == "fused" and site.kind == "rmsnorm", site.reason
    assert site.spec.eps_mode == mode
    assert (site.spec.norm_scale, site.spec.eps) == (pytest.approx(scale), pytest.approx(eps, rel=1e-6, abs=0.0))
    assert not ops_in(gm) & {"aten.linalg_vector_norm", "aten.sqrt", "aten.clamp_min", "aten.div"}
    ours, eager = gm(x), module(x)
    assert ours[0, 0].isnan().all() == eager[0, 0].isnan().all()
    assert_same(ours[:, 1:], eager[:, 1:])


def test_half_precision_normalize_keeps_its_rounded_eps() -> None:
    """F.normalize in float16 clamps at float16(1e-12) = 0: a zero row is NaN in eager, and stays NaN fused."""
    module, x = Norm(lambda m, x: F.normalize(x, dim=-1), 8).half(), _x(8, torch.float16)
    x[0, 0] = 0.0
    gm, ctx = run_pass(NormPass(), module, (x,))
    assert ctx.sites[0].spec.eps == 0.0
    assert gm(x)[0, 0].isnan().all() and module(x)[0, 0].isnan().all()


def test_ones_gain_and_layer_norm_offset_weights_are_absorbed() -> None:
    """ScaleNorm's one-value gain becomes a width vector; x-transformers' LayerNorm · (gamma + 1) a LayerNorm
    weight (its op has no offset)."""
    gain = nn.Parameter(torch.tensor([1.7]))
    scale_norm = lambda m, x: F.normalize(x, dim=-1) * 4.0 * (gain + 1.0)  # noqa: E731
    layer_norm = lambda m, x: F.layer_norm(x, (x.shape[-1],)) * (m.weight + 1.0)  # noqa: E731
    for fn, kind in ((scale_norm, "rmsnorm"), (layer_norm, "layernorm")):
        module, x = Norm(fn, 16), _x(16)
        gm, ctx = run_pass(NormPass(), module, (x,))
        (site,) = ctx.sites
        assert site.kind == kind and site.status == "fused" and site.spec.has_weight
        assert "aten.mul" not in ops_in(gm)
        assert_same(gm(x), module(x))


# ----------------------------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("width", [8, 59])
@pytest.mark.parametrize("spelling", sorted(LN_SPELLINGS))
def test_layernorm_spellings_fuse(spelling: str, width: int) -> None:
    fn, has_weight, has_bias = LN_SPELLINGS[spelling]
    module, x = Norm(fn, width), _x(width)
    gm, ctx = run_pass(NormPass(), module, (x,))
    (site,) = ctx.sites
    assert site.status == "fused" and site.kind == "layernorm"
    assert (site.spec.has_weight, site.spec.has_bias) == (has_weight, has_bias)
    assert "tilefuse.layer_norm" in ops_in(gm)
    assert not ops_in(gm) & {"aten.rsqrt", "aten.sqrt", "aten.layer_norm", "aten.native_layer_norm", "aten.var"}
    assert_same(gm(x), module(x))


def test_layernorm_bf16_is_no_worse_than_eager() -> None:
    module, x = nn.LayerNorm(64).to(torch.bfloat16), _x(64, torch.bfloat16)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.5)
    gm, ctx = run_pass(NormPass(), module, (x,))
    assert ctx.counters["layernorm_fused"] == 1
    assert_no_worse_than_eager(gm(x), module(x), as_double(module)(x.double()), floor=1e-3)


# ------------------------------------------------------------------------------------------------ residual
class ResidualNorm(nn.Module):
    """h = x + y feeds a norm and is also read afterwards (the residual stream)."""

    def __init__(self, norm: Spelling, width: int, keep_sum: bool = True) -> None:
        super().__init__()
        self.norm = Norm(norm, width)
        self.keep_sum = keep_sum

    def forward(self, x: Tensor, y: Tensor) -> Any:
        h = x + y
        return (self.norm(h), h * 2.0) if self.keep_sum else self.norm(h)


@pytest.mark.parametrize(
    ("spelling", "op"), [(hf_llama_rms, "add_rms_norm"), (LN_SPELLINGS["functional"][0], "add_layer_norm")]
)
def test_residual_add_folds_into_norm(spelling: Spelling, op: str) -> None:
    module, x, y = ResidualNorm(spelling, 16), _x(16), _x(16) * 0.5
    gm, ctx = run_pass(NormPass(), module, (x, y))
    (site,) = ctx.sites
    assert site.status == "fused" and site.spec.residual
    assert len(tilefuse_nodes(gm, op)) == 1 and "aten.add" not in ops_in(gm)
    assert_same(gm(x, y), module(x, y))


def test_residual_needs_the_sum_to_be_read_elsewhere() -> None:
    module, x, y = ResidualNorm(hf_llama_rms, 16, keep_sum=False), _x(16), _x(16)
    gm, ctx = run_pass(NormPass(), module, (x, y))
    assert not ctx.sites[0].spec.residual
    assert {"tilefuse.rms_norm", "aten.add"} <= ops_in(gm)
    assert_same(gm(x, y), module(x, y))


def test_residual_respects_enabled_and_broadcasting() -> None:
    module, x, y = ResidualNorm(hf_llama_rms, 16), _x(16), _x(16)
    gm, ctx = run_pass(NormPass(), module, (x, y), PassContext(enabled=frozenset({"rmsnorm"})))
    assert not ctx.sites[0].spec.residual and "tilefuse.rms_norm" in ops_in(gm)
    assert_same(gm(x, y), module(x, y))
    bias = torch.randn(16)  # x + bias broadcasts: not a residual stream the fused add could handle
    gm, ctx = run_pass(NormPass(), module, (x, bias))
    assert ctx.counters["rmsnorm_fused"] == 1 and not ctx.sites[0].spec.residual
    assert_same(gm(x, bias), module(x, bias))


def test_residual_reader_before_the_norm_keeps_the_add() -> None:
    norm = Norm(hf_llama_rms, 16)

    def fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h = x + y
        early = h * 3.0  # read before the norm's weight is even loaded
        return norm(h), early

    x, y = _x(16), _x(16)
    gm, ctx = run_pass(NormPass(), fn, (x, y))
    assert ctx.counters["rmsnorm_fused"] == 1 and "aten.add" in ops_in(gm)
    assert_same(gm(x, y), fn(x, y))


# ----------------------------------------------------------------------------------------------- declines
def _rsqrt_returned(m: Norm, x: Tensor) -> tuple[Tensor, Tensor]:
    r = torch.rsqrt(_ms(x) + 1e-6)
    return x * r * m.weight, r


def _norm_returned(m: Norm, x: Tensor) -> tuple[Tensor, Tensor]:
    norm = _l2(x)
    return x / norm.clamp_min(1e-6), norm


# name -> (spelling, expected words in the reason, op that must survive)
DECLINES: dict[str, tuple[Spelling, str, str]] = {
    "rsqrt_reused": (_rsqrt_returned, "intermediate rsqrt is used outside the norm", "aten.rsqrt"),
    "tensor_eps": (lambda m, x: x * torch.rsqrt(_ms(x) + m.eps) * m.weight, "eps is a tensor", "aten.rsqrt"),
    "two_dims_manual": (
        lambda m, x: x * torch.rsqrt(x.pow(2).mean((-2, -1), keepdim=True) + 1e-6),
        "only the last dim",
        "aten.rsqrt",
    ),
    "two_dims_layer_norm": (lambda m, x: F.layer_norm(x, x.shape[-2:]), "last 2 dims", "aten.layer_norm"),
    "two_dims_rms_norm": (lambda m, x: F.rms_norm(x, x.shape[-2:]), "last 2 dims", "aten.rms_norm"),
    "unbiased_var": (
        lambda m, x: (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True) + 1e-5),
        "correction",
        "aten.rsqrt",
    ),
    "normalize_p1": (lambda m, x: F.normalize(x, p=1, dim=-1), "ord=1", "aten.linalg_vector_norm"),
    "normalize_not_last_dim": (lambda m, x: F.normalize(x, dim=1), "dims [1]", "aten.linalg_vector_norm"),
    "norm_returned": (_norm_returned, "intermediate linalg_vector_norm is used outside", "aten.linalg_vector_norm"),
    "native_stats_used": (
        lambda m, x: torch.native_layer_norm(x, (x.shape[-1],), m.weight, m.bias, 1e-5)[:2],
        "mean/rstd",
        "aten.native_layer_norm",
    ),
}


@pytest.mark.parametrize("name", sorted(DECLINES))
def test_declines_with_a_reason_and_leaves_the_graph(name: str) -> None:
    fn, words, survivor = DECLINES[name]
    module, x = Norm(fn, 8), _x(8)
    gm, ctx = run_pass(NormPass(), module, (x,))
    assert [s.status for s in ctx.sites] == ["declined"]
    assert words in reasons(ctx)[0]
    assert survivor in ops_in(gm) and not any(op.startswith("tilefuse.") for op in ops_in(gm))
    assert_same(gm(x), module(x))


def test_reused_normalized_value_fuses_without_the_weight() -> None:
    def fn(m: Norm, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x * torch.rsqrt(_ms(x) + 1e-6)
        return y * m.weight, y

    module, x = Norm(fn, 8), _x(8)
    gm, ctx = run_pass(NormPass(), module, (x,))
    assert ctx.sites[0].status == "fused" and not ctx.sites[0].spec.has_weight
    assert_same(gm(x), module(x))


def test_disabled_kinds_are_not_touched() -> None:
    module, x = Norm(hf_llama_rms, 8), _x(8)
    gm, ctx = run_pass(NormPass(), module, (x,), PassContext(enabled=frozenset({"layernorm", "rope"})))
    assert ctx.sites == [] and "aten.rsqrt" in ops_in(gm)


# ------------------------------------------------------------------------------------- Hugging Face models
# name -> (kind, sites in 2 layers, residual sites)
HF_NORMS = {
    "llama": ("rmsnorm", 5, 3),
    "gemma": ("rmsnorm", 5, 3),
    "gpt2": ("layernorm", 5, 3),
    "bert": ("layernorm", 5, 0),
    "t5": ("rmsnorm", 5, 3),
}


@pytest.mark.parametrize("name", sorted(HF_NORMS))
def test_hf_model_norms_all_fuse(name: str) -> None:
    model, ids = hf_model(name), hf_inputs()
    kind, count, residual = HF_NORMS[name]
    gm, ctx = run_pass(NormPass(), model, (ids,))
    assert len(sites(ctx, kind, "fused")) == count and reasons(ctx) == []
    assert sum(s.spec.residual for s in ctx.sites) == residual
    assert not ops_in(gm) & {"aten.rsqrt", "aten.layer_norm"}
    if name == "gemma":
        assert {s.spec.weight_offset for s in ctx.sites} == {1.0}
    assert_same(gm(ids), model(ids), atol=1e-4, rtol=1e-4)


def test_hf_llama_bf16_is_no_worse_than_eager() -> None:
    model, ids = hf_model("llama"), hf_inputs()
    bf16 = as_double(model).to(torch.bfloat16)
    gm, ctx = run_pass(NormPass(), bf16, (ids,))
    assert ctx.counters["rmsnorm_fused"] == 5
    assert_no_worse_than_eager(gm(ids), bf16(ids), as_double(model)(ids), floor=1e-2)
