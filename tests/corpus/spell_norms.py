"""RMSNorm, LayerNorm and L2 norms as libraries write them, each fused with its exact eps placement.

x-transformers writes RMSNorm as `F.normalize(x) * sqrt(d) * g`: eps clamps the norm (NormSpec.eps_mode
"clamp_norm"), it is not added to the mean square. Negatives: a p=1 or non-last-dim normalize and a mean over the
wrong axis are declined; a tensor divided by another tensor's norm is no site; a per-position (not per-feature)
multiplier stays outside the fused op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _corpus import Spelling
from torch import Tensor, nn

from tilefuse.benchmarks.harness import perturbed

B, N, D = 2, 6, 16


def _x(*shape: int) -> Tensor:
    return torch.randn(*(shape or (B, N, D)), generator=torch.Generator().manual_seed(0)) * 2 + 0.3


def _eps_modes(*modes: str, weighted: int | None = None) -> Callable[[dict[str, list[Any]]], None]:
    """Check the fused norms' eps placements (and how many took a weight: none dropped, none wrongly absorbed)."""

    def check(specs: dict[str, list[Any]]) -> None:
        norms = [s for kind in ("rmsnorm", "layernorm") for s in specs.get(kind, [])]
        assert sorted(s.eps_mode for s in norms) == sorted(modes), norms
        assert weighted is None or sum(s.has_weight for s in norms) == weighted, norms

    return check


class Stack(nn.Module):
    """Apply `norms` one after another (one graph holds every spelling of a library: one compile)."""

    def __init__(self, *norms: nn.Module) -> None:
        super().__init__()
        self.norms = nn.ModuleList(norms)

    def forward(self, x: Tensor) -> Tensor:
        for norm in self.norms:
            x = norm(x) + 0.5 * x  # a reader of x besides the norm: the residual stays an add
        return x


# ------------------------------------------------------------------------------------------- x-transformers
class XtRMSNorm(nn.Module):
    """x-transformers RMSNorm / ScaleNorm / SimpleRMSNorm: F.normalize(x) · √d · (g + unit_offset)."""

    def __init__(self, gain_shape: tuple[int, ...] | None, unit_offset: bool = False) -> None:
        super().__init__()
        self.scale, self.unit_offset = D**0.5, unit_offset
        self.g = nn.Parameter(torch.full(gain_shape, 1.0 - unit_offset)) if gain_shape is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.g is None:
            return F.normalize(x, dim=-1) * self.scale
        return F.normalize(x, dim=-1) * self.scale * (self.g + float(self.unit_offset))


class XtLayerNorm(nn.Module):
    """x-transformers LayerNorm: bias-less nn.LayerNorm, then · (gamma + unit_offset)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D, elementwise_affine=False)
        self.gamma = nn.Parameter(torch.zeros(D))

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x) * (self.gamma + 1.0)


class XtQKNorm(nn.Module):
    """x-transformers qk_norm: l2norm over groups of the head dim (rearrange '... (g d) -> ... g d'), then a
    learned per-feature scale."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.q_scale = nn.Parameter(torch.ones(D))

    def forward(self, q: Tensor) -> Tensor:
        t = q.unflatten(-1, (self.groups, D // self.groups))
        t = F.normalize(t, p=2, dim=-1).flatten(-2)
        return t * self.q_scale


class XtAdaptiveRMSNorm(nn.Module):
    """x-transformers AdaptiveRMSNorm: the gain comes from a condition, per position: not a weight to absorb."""

    def __init__(self) -> None:
        super().__init__()
        self.to_gamma = nn.Linear(D, D, bias=False)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * D**0.5 * (self.to_gamma(cond) + 1.0)


def _xt_norms() -> tuple[nn.Module, tuple[Any, ...]]:
    norms = (XtRMSNorm((D,)), XtRMSNorm((D,), unit_offset=True), XtRMSNorm((1,)), XtRMSNorm(None), XtLayerNorm())
    return perturbed(Stack(*norms)), (_x(),)


def _xt_real() -> tuple[nn.Module, tuple[Any, ...]]:
    import x_transformers.x_transformers as xt

    norms = (xt.RMSNorm(D), xt.RMSNorm(D, unit_offset=True), xt.ScaleNorm(D), xt.SimpleRMSNorm(D), xt.LayerNorm(D))
    return perturbed(Stack(*norms)), (_x(),)


XT_MODES = _eps_modes(*["clamp_norm"] * 4, "mean_square", weighted=4)  # SimpleRMSNorm has no gain


# ---------------------------------------------------------------------------------------- torchtune, litgpt
class TorchtuneRMSNorm(nn.Module):
    """torchtune RMSNorm: F.rms_norm on x.float() with the fp32 scale, cast back with .to(x.dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(D))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (D,), weight=self.scale, eps=1e-6).to(x.dtype)


class LitgptRMSNorm(nn.Module):
    """litgpt RMSNorm: fp32 mean(x·x), x · rsqrt, times (1 + w) with add_unit_offset, cast back."""

    def __init__(self, add_unit_offset: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))
        self.add_unit_offset = add_unit_offset

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x_normed = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + 1e-5)
        weight = (1 + self.weight) if self.add_unit_offset else self.weight
        return (x_normed * weight.float()).to(dtype=dtype)


def _torchtune_real() -> tuple[nn.Module, tuple[Any, ...]]:
    from torchtune.models.gemma.rms_norm import GemmaRMSNorm
    from torchtune.modules import RMSNorm
    from torchtune.modules.layer_norm import Fp32LayerNorm

    return perturbed(Stack(RMSNorm(D), GemmaRMSNorm(D), Fp32LayerNorm(D))), (_x(),)


# ------------------------------------------------------------------------------------------------ diffusers
class DiffusersRMSNorm(nn.Module):
    """diffusers RMSNorm: fp32 variance, x · rsqrt, then weight and an optional bias (elementwise_affine=False:
    cast back only)."""

    def __init__(self, affine: bool, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D)) if affine else None
        self.bias = nn.Parameter(torch.zeros(D)) if bias else None

    def forward(self, h: Tensor) -> Tensor:
        dtype = h.dtype
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + 1e-6)
        if self.weight is None:
            return h.to(dtype)
        h = h * self.weight
        return h + self.bias if self.bias is not None else h


class AdaLayerNormZero(nn.Module):
    """diffusers AdaLayerNormZero: LayerNorm without affine, then x · (1 + scale) + shift from the embedding: the
    norm fuses, the modulation (per sample) stays outside."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, 2 * D)
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift, scale = self.linear(F.silu(emb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class LpNorm(nn.Module):
    """diffusers LpNorm (qk_norm="l2"): F.normalize(x, p=2, dim=-1, eps)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2, dim=-1, eps=1e-6)


def _diffusers_norms() -> tuple[nn.Module, tuple[Any, ...]]:
    norms = (DiffusersRMSNorm(True, True), DiffusersRMSNorm(False, False), LpNorm())
    return perturbed(Stack(*norms)), (_x(),)


def _diffusers_real() -> tuple[nn.Module, tuple[Any, ...]]:
    from diffusers.models.normalization import FP32LayerNorm, LpNorm, RMSNorm

    norms = (
        RMSNorm(D, 1e-6, bias=True),
        RMSNorm(D, 1e-6, elementwise_affine=False),
        FP32LayerNorm(D, elementwise_affine=False, bias=False),
        LpNorm(eps=1e-6),
    )
    return perturbed(Stack(*norms)), (_x(),)


# ------------------------------------------------------------------------------------------------------ timm
class LayerNorm2d(nn.LayerNorm):
    """timm LayerNorm2d: NCHW permuted to channels-last, layer_norm over channels, permuted back."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------- hand-written
class Fn(nn.Module):
    """A norm spelled by a function of x (and of this module's per-position weight `w`)."""

    def __init__(self, fn: Callable[[Any, Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.g = nn.Parameter(torch.ones(D))
        self.w = nn.Parameter(torch.ones(N, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self, x)


def rms_plus_eps(m: Fn, x: Tensor) -> Tensor:
    """eps added to the RMS, not to the mean square: x / (‖x‖·d^-½ + eps)."""
    return x / (x.norm(dim=-1, keepdim=True) * D**-0.5 + 1e-3) * m.g


def vector_norm_clamp(m: Fn, x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-2)


def root_mean_square_plus_eps(m: Fn, x: Tensor) -> Tensor:
    return 3.0 * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-3)


def zero_rows(m: Fn, x: Tensor) -> Tensor:
    """Rows of zeros: F.normalize clamps their norm to eps (output 0, gradient g / eps), no NaN."""
    return F.normalize(x * (x[..., :1] > 0), dim=-1) * D**0.5


def negative_factor(m: Fn, x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1) * -2.0  # a negative factor cannot fold into the norm: it stays outside


def per_position_weight(m: Fn, x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1) * D**0.5 * m.w  # w: [N, 1], one value per position: not the norm's weight


HAND = (rms_plus_eps, vector_norm_clamp, root_mean_square_plus_eps, zero_rows, negative_factor, per_position_weight)


# Look-alikes: not a 2-norm over the last axis (declined), or not a tensor divided by its own norm (no site).
def normalize_p1(m: Fn, x: Tensor) -> Tensor:
    return F.normalize(x, p=1, dim=-1)


def normalize_dim1(m: Fn, x: Tensor) -> Tensor:
    return F.normalize(x, dim=1)


def mean_wrong_axis(m: Fn, x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + 1e-6)


def other_tensors_norm(m: Fn, x: Tensor) -> Tensor:
    """diffusers' versatile diffusion: embeds / norm(pooled): divided by another tensor's norm."""
    return x / torch.norm(x.flip(1), dim=-1, keepdim=True)


LOOK_ALIKES = (normalize_p1, normalize_dim1, mean_wrong_axis, other_tensors_norm)


def _stack(*fns: Callable[[Any, Tensor], Tensor]) -> Callable[[], tuple[nn.Module, tuple[Any, ...]]]:
    return lambda: (perturbed(Stack(*map(Fn, fns))), (_x(),))


def _rms(count: int = 1, **kw: Any) -> dict[str, Any]:
    return {"fused": {"rmsnorm": count}, **kw}


SPELLINGS = [
    Spelling("norms", "x-transformers", _xt_norms, {"rmsnorm": 4, "layernorm": 1}, check_specs=XT_MODES),
    Spelling("modules", "x-transformers", _xt_real, {"rmsnorm": 4, "layernorm": 1}, check_specs=XT_MODES),
    Spelling(
        "qk_norm",
        "x-transformers",
        lambda: (perturbed(Stack(XtQKNorm(1), XtQKNorm(2))), (_x(),)),
        **_rms(2, check_specs=_eps_modes("clamp_norm", "clamp_norm")),
    ),
    Spelling("adaptive_rms_norm", "x-transformers", lambda: (perturbed(XtAdaptiveRMSNorm()), (_x(), _x())), **_rms()),
    Spelling("norms", "torchtune", lambda: (perturbed(Stack(TorchtuneRMSNorm())), (_x(),)), **_rms()),
    Spelling("modules", "torchtune", _torchtune_real, {"rmsnorm": 2, "layernorm": 1}),
    Spelling(
        "rms_norm", "litgpt", lambda: (perturbed(Stack(LitgptRMSNorm(False), LitgptRMSNorm(True))), (_x(),)), **_rms(2)
    ),
    Spelling(
        "norms",
        "diffusers",
        _diffusers_norms,
        **_rms(3, check_specs=_eps_modes("mean_square", "mean_square", "clamp_norm")),
    ),
    Spelling("modules", "diffusers", _diffusers_real, {"rmsnorm": 3, "layernorm": 1}),
    Spelling(
        "ada_layer_norm_zero", "diffusers", lambda: (perturbed(AdaLayerNormZero()), (_x(), _x(B, D))), {"layernorm": 1}
    ),
    Spelling("layer_norm_2d", "timm", lambda: (perturbed(LayerNorm2d(D)), (_x(B, D, 3, 5),)), {"layernorm": 1}),
    Spelling(
        "vector_norms",
        "hand",
        _stack(*HAND),
        **_rms(
            len(HAND),
            check_specs=_eps_modes(
                "add_norm", "clamp_norm", "add_norm", "clamp_norm", "clamp_norm", "clamp_norm", weighted=1
            ),
        ),
    ),
    Spelling("norm_look_alikes", "hand", _stack(*LOOK_ALIKES), declined={"rmsnorm": 3}),
]
