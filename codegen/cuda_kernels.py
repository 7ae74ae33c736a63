"""Register the CUDA implementations (codegen/gpu.py) behind the tilefuse:: custom ops.

Kept apart from custom_ops.py so the op definitions stay device-neutral; triton is imported only when a CUDA
tensor first reaches an op. Each implementation is custom_ops' factory for the op around a gpu.py function, so the
arguments are bound by the op's record (codegen/op_schema.py), never listed here. The attention op returns the
log-sum-exp with its output; the backward reads that saved (out, lse) instead of recomputing the forward.
"""

from __future__ import annotations

import os

from torch import Tensor

from ..specs import eps_mode_name
from . import custom_ops as ops
from . import gpu
from .op_schema import NormArgs


def _norm_cuda(args: NormArgs, rms: bool) -> tuple[Tensor, Tensor | None]:
    mode = eps_mode_name(args.eps_mode)
    eps = float(args.eps)
    return gpu.norm(args.x, args.weight, args.bias, args.residual, eps, args.weight_offset, rms, mode, args.norm_scale)


def _norm_grads_cuda(grad: Tensor, args: NormArgs, rms: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    mode = eps_mode_name(args.eps_mode)
    return gpu.norm_backward(grad, args.x, args.weight, float(args.eps), args.weight_offset, rms, mode, args.norm_scale)


_KERNELS = (
    (ops.attention, ops.attention_impl(gpu.attention_with_lse)),
    (ops.attention_backward, ops.attention_backward_impl(gpu.attention_grads)),
    (ops.rope, ops.rope_impl(gpu.rope)),
    (ops.rope_backward, ops.rope_backward_impl(gpu.rope_backward)),
    (ops.rms_norm, ops.norm_impl(True, False, _norm_cuda)),
    (ops.layer_norm, ops.norm_impl(False, False, _norm_cuda)),
    (ops.add_rms_norm, ops.norm_impl(True, True, _norm_cuda)),
    (ops.add_layer_norm, ops.norm_impl(False, True, _norm_cuda)),
    (ops.norm_backward, ops.norm_backward_impl(_norm_grads_cuda)),
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
