"""Register the CUDA implementations (codegen/gpu.py) behind the tilefuse:: custom ops.

Kept apart from custom_ops.py so the op definitions stay device-neutral; triton is imported only when a CUDA
tensor first reaches an op. The attention op returns the log-sum-exp with its output; the backward reads that
saved (out, lse) instead of recomputing the forward.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..specs import eps_mode_name
from . import custom_ops as ops
from . import gpu
from . import reference as ref
from .layouts import in_order


def _attention_cuda(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, alibi_slopes: Tensor | None,
    cos: Tensor | None, sin: Tensor | None, scale: float, causal: bool, bottom_right: bool,
    window: int, softcap: float, rope_layout: int, rotary_dim: int, dropout_p: float = 0.0,
    rng: Tensor | None = None, out_order: list[int] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    inputs = ref.AttnInputs(q, k, v, mask, alibi_slopes, cos, sin, rng)
    flags = ref.AttnFlags(scale, causal, bottom_right, window, softcap, rope_layout, rotary_dim, dropout_p)
    out, lse = gpu.attention_with_lse(inputs, flags, out_order)  # the kernels write out in out_order
    return in_order(out, out_order), lse.contiguous()


def _attention_backward_cuda(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, alibi_slopes: Tensor | None,
    cos: Tensor | None, sin: Tensor | None, out: Tensor, lse: Tensor, scale: float, causal: bool,
    bottom_right: bool, window: int, softcap: float, rope_layout: int, rotary_dim: int, dropout_p: float = 0.0,
    rng: Tensor | None = None, input_grads: list[bool] | None = None, grad_lse: Tensor | None = None,
) -> ops.AttnGradOutputs:  # fmt: skip
    inputs = ref.AttnInputs(q, k, v, mask, alibi_slopes, cos, sin, rng)
    flags = ref.AttnFlags(scale, causal, bottom_right, window, softcap, rope_layout, rotary_dim, dropout_p)
    grads = gpu.attention_grads(grad_out, inputs, flags, out, lse, ops.extra_grads_wanted(input_grads), grad_lse)
    return ops.attention_grad_outputs(grads, q)


def _rope_cuda(
    x: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, out_order: list[int] | None = None
) -> Tensor:
    return in_order(gpu.rope(x, cos, sin, layout, rotary_dim, out_order), out_order)


def _rope_backward_cuda(
    grad: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, x_dtype: torch.dtype
) -> Tensor:
    return gpu.rope_backward(grad, cos, sin, layout, rotary_dim, x_dtype).contiguous()


def _rms_norm_cuda(
    x: Tensor, weight: Tensor | None, eps: float, weight_offset: float, eps_mode: int = 0, norm_scale: float = 1.0
) -> Tensor:
    mode = eps_mode_name(eps_mode)
    return gpu.norm(x, weight, None, None, eps, weight_offset, True, mode, norm_scale)[0].contiguous()


def _layer_norm_cuda(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return gpu.norm(x, weight, bias, None, eps, 0.0, rms=False)[0].contiguous()


def _with_sum(pair: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor]:
    y, total = pair
    assert total is not None  # residual was given
    return y.contiguous(), total.contiguous()


def _add_rms_norm_cuda(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, weight_offset: float, eps_mode: int = 0,
    norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return _with_sum(gpu.norm(x, weight, None, residual, eps, weight_offset, True, eps_mode_name(eps_mode), norm_scale))


def _add_layer_norm_cuda(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    return _with_sum(gpu.norm(x, weight, bias, residual, eps, 0.0, rms=False))


def _norm_backward_cuda(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, weight_offset: float, rms: bool, eps_mode: int = 0,
    norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    mode = eps_mode_name(eps_mode)
    dx, dweight, dbias = gpu.norm_backward(grad, x, weight, eps, weight_offset, rms, mode, norm_scale)
    empty = x.new_empty((0,))
    return dx.contiguous(), (dweight if dweight is not None else empty).contiguous(), dbias.to(x.dtype).contiguous()


_KERNELS = (
    (ops.attention, _attention_cuda),
    (ops.attention_backward, _attention_backward_cuda),
    (ops.rope, _rope_cuda),
    (ops.rope_backward, _rope_backward_cuda),
    (ops.rms_norm, _rms_norm_cuda),
    (ops.layer_norm, _layer_norm_cuda),
    (ops.add_rms_norm, _add_rms_norm_cuda),
    (ops.add_layer_norm, _add_layer_norm_cuda),
    (ops.norm_backward, _norm_backward_cuda),
)


def cpu_runs_kernels() -> bool:
    """Whether CPU tensors run the Triton kernels (under the interpreter) instead of the reference: when
    TRITON_INTERPRET=1, unless TILEFUSE_CPU_KERNELS=reference; TILEFUSE_CPU_KERNELS=triton asks for it."""
    mode = os.environ.get("TILEFUSE_CPU_KERNELS")
    if mode not in (None, "", "triton", "reference"):
        raise ValueError(f"TILEFUSE_CPU_KERNELS={mode!r}; allowed: 'triton', 'reference'")
    return mode == "triton" or (not mode and os.environ.get("TRITON_INTERPRET") == "1")


def _register(device: str) -> None:
    for op, kernel in _KERNELS:
        op.register_kernel(device)(kernel)


_register("cuda")
if cpu_runs_kernels():
    _register("cpu")
