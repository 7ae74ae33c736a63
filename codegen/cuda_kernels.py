"""Register the CUDA implementations (codegen/gpu.py) behind the tilefuse:: custom ops.

Kept apart from custom_ops.py so the op definitions stay device-neutral; triton is imported only when a CUDA
tensor first reaches an op.
"""

from __future__ import annotations

from torch import Tensor

from . import custom_ops as ops
from . import gpu
from . import reference as ref


@ops.attention.register_kernel("cuda")
def _attention_cuda(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, alibi_slopes: Tensor | None,
    cos: Tensor | None, sin: Tensor | None, scale: float, causal: bool, bottom_right: bool,
    window: int, softcap: float, rope_layout: int, rotary_dim: int,
) -> Tensor:  # fmt: skip
    inputs = ref.AttnInputs(q, k, v, mask, alibi_slopes, cos, sin)
    flags = ref.AttnFlags(scale, causal, bottom_right, window, softcap, rope_layout, rotary_dim)
    return gpu.attention(inputs, flags).contiguous()


@ops.attention_backward.register_kernel("cuda")
def _attention_backward_cuda(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, alibi_slopes: Tensor | None,
    cos: Tensor | None, sin: Tensor | None, scale: float, causal: bool, bottom_right: bool,
    window: int, softcap: float, rope_layout: int, rotary_dim: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    inputs = ref.AttnInputs(q, k, v, mask, alibi_slopes, cos, sin)
    flags = ref.AttnFlags(scale, causal, bottom_right, window, softcap, rope_layout, rotary_dim)
    dq, dk, dv = gpu.attention_backward(grad_out, inputs, flags)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@ops.rope.register_kernel("cuda")
def _rope_cuda(x: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int) -> Tensor:
    return gpu.rope(x, cos, sin, layout, rotary_dim).contiguous()


@ops.rms_norm.register_kernel("cuda")
def _rms_norm_cuda(x: Tensor, weight: Tensor | None, eps: float, weight_offset: float) -> Tensor:
    return gpu.norm(x, weight, None, None, eps, weight_offset, rms=True)[0].contiguous()


@ops.layer_norm.register_kernel("cuda")
def _layer_norm_cuda(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return gpu.norm(x, weight, bias, None, eps, 0.0, rms=False)[0].contiguous()


def _with_sum(pair: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor]:
    y, total = pair
    assert total is not None  # residual was given
    return y.contiguous(), total.contiguous()


@ops.add_rms_norm.register_kernel("cuda")
def _add_rms_norm_cuda(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, weight_offset: float
) -> tuple[Tensor, Tensor]:
    return _with_sum(gpu.norm(x, weight, None, residual, eps, weight_offset, rms=True))


@ops.add_layer_norm.register_kernel("cuda")
def _add_layer_norm_cuda(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    return _with_sum(gpu.norm(x, weight, bias, residual, eps, 0.0, rms=False))


@ops.norm_backward.register_kernel("cuda")
def _norm_backward_cuda(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, weight_offset: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = gpu.norm_backward(grad, x, weight, eps, weight_offset, rms)
    empty = x.new_empty((0,))
    return dx.contiguous(), (dweight if dweight is not None else empty).contiguous(), dbias.to(x.dtype).contiguous()
