"""RMSNorm / LayerNorm (with and without the fused residual add) and RoPE, forward and backward, on the GPU.

Norms: a covering design over dtype (bf16, fp16, fp32), width (a power of two, a non-power of two, a wide one) and
residual, for each kind. RoPE: rotate-half over the whole head, interleaved over part of it with tables broadcast
over the heads of a [B, N, H, D] tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from _kernel_watch import KernelWatch
from _numerics import check_against_golden, eager_norm, eager_rope
from _profile import DEVICE, PROFILE
from test_gpu_attention import BF16, FP16, rope_tables
from torch import Tensor

from tilefuse import ops

FP32 = torch.float32
NARROW, ODD, WIDE = PROFILE.norm_widths
RMS_EPS, LN_EPS = 1e-6, 1e-5


class NormCase(NamedTuple):
    rms: bool
    dtype: torch.dtype
    width: int
    residual: bool

    @property
    def name(self) -> str:
        kind = "rms" if self.rms else "layer"
        return f"{kind}-{str(self.dtype).removeprefix('torch.')}-{self.width}{'-residual' if self.residual else ''}"

    @property
    def inputs(self) -> list[str]:
        return ["x", *(["residual"] if self.residual else []), "weight", *([] if self.rms else ["bias"])]


NORM_CASES = [
    NormCase(True, BF16, WIDE, True),
    NormCase(True, FP16, NARROW, False),
    NormCase(True, FP32, ODD, True),
    NormCase(False, BF16, ODD, False),
    NormCase(False, FP16, WIDE, True),
    NormCase(False, FP32, NARROW, False),
]


def _norm_fns(case: NormCase) -> tuple[Callable[..., object], Callable[..., object]]:
    """(ours, eager), both taking the tensors named by case.inputs in that order."""

    def unpack(tensors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        named = dict(zip(case.inputs, tensors, strict=True))
        return named["x"], named.get("residual"), named["weight"], named.get("bias")

    def ours(*tensors: Tensor) -> object:
        x, residual, weight, bias = unpack(tensors)
        if case.rms:
            return ops.rms_norm(x, weight, RMS_EPS, residual=residual)
        return ops.layer_norm(x, weight, bias, LN_EPS, residual=residual)

    def eager(*tensors: Tensor) -> object:
        x, residual, weight, bias = unpack(tensors)
        return eager_norm(x, residual, weight, bias, RMS_EPS if case.rms else LN_EPS, case.rms)

    return ours, eager


def _norm_inputs(case: NormCase) -> list[Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(case.width)
    rows = PROFILE.norm_rows

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, device=DEVICE) * scale + shift).to(case.dtype)

    tensors = {
        "x": randn(2, rows // 2, case.width, scale=2.0, shift=0.5),
        "residual": randn(2, rows // 2, case.width),
        "weight": randn(case.width, scale=0.1, shift=1.0),
        "bias": randn(case.width, scale=0.1),
    }
    return [tensors[name] for name in case.inputs]


@pytest.mark.parametrize("case", NORM_CASES, ids=[c.name for c in NORM_CASES])
def test_norm_forward_backward_match_golden(case: NormCase, kernels: KernelWatch) -> None:
    ours, eager = _norm_fns(case)
    outputs = ["y", "sum"] if case.residual else ["y"]
    check_against_golden(ours, eager, _norm_inputs(case), {}, (outputs, case.inputs))
    kernels.assert_ran("norm_forward_kernel", "norm_backward_kernel")


# ----------------------------------------------------------------------------------------------------- RoPE
class RopeCase(NamedTuple):
    name: str
    dtype: torch.dtype
    layout: str
    head_dim: int
    rotary_dim: int


D_SMALL, D_LARGE = PROFILE.head_dims
ROPE_CASES = [
    RopeCase("rotate_half-bf16-bhnd", BF16, "rotate_half", D_LARGE, D_LARGE),
    RopeCase("interleaved-partial-fp16-bnhd", FP16, "interleaved", D_SMALL, D_SMALL // 2),
]


def _rope_inputs(case: RopeCase) -> tuple[Tensor, Tensor, Tensor]:
    """x and its tables: [B, H, N, D] with [N, rd] tables, or [B, N, H, D] with [N, 1, rd] tables (interleaved)."""
    gen = torch.Generator(device=DEVICE).manual_seed(case.head_dim)
    batch, heads, n = PROFILE.batch, 2 * PROFILE.kv_heads, PROFILE.seq
    cos, sin = rope_tables(n, case.rotary_dim, case.dtype)
    if case.layout == "rotate_half":
        x = torch.randn(batch, heads, n, case.head_dim, generator=gen, device=DEVICE)
        return x.to(case.dtype), cos, sin
    half = case.rotary_dim // 2  # interleaved pairs (2i, 2i+1) share frequency i
    cos, sin = (t[:, :half].repeat_interleave(2, dim=-1)[:, None, :] for t in (cos, sin))
    x = torch.randn(batch, n, heads, case.head_dim, generator=gen, device=DEVICE)
    return x.to(case.dtype), cos, sin


@pytest.mark.parametrize("case", ROPE_CASES, ids=[c.name for c in ROPE_CASES])
def test_rope_forward_backward_match_golden(case: RopeCase, kernels: KernelWatch) -> None:
    x, cos, sin = _rope_inputs(case)
    options = {"cos": cos, "sin": sin, "layout": case.layout, "rotary_dim": case.rotary_dim}
    check_against_golden(ops.apply_rope, eager_rope, [x], options, (["y"], ["x"]))
    kernels.assert_ran("rope_kernel")
    assert {launch.constexprs["BACKWARD"] for launch in kernels.of("rope_kernel")} == {False, True}
