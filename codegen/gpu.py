"""CUDA implementations of the fused ops: the Triton kernels, or the reference with a logged reason.

Each launcher raises ValueError for a case its kernel does not cover (RoPE inside attention, fp64, ...); the
op then runs the reference implementation on the GPU, so a site never fails for lack of a kernel.
"""

from __future__ import annotations

import logging

from torch import Tensor

from . import cpu
from . import reference as ref

log = logging.getLogger("tilefuse.codegen")


def _fallback(op: str, err: ValueError) -> None:
    log.debug("tilefuse::%s runs the reference implementation: %s", op, err)


def attention(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> Tensor:
    from .attention_fwd import attention_forward_triton

    try:
        return attention_forward_triton(inputs, flags)[0]
    except ValueError as err:
        _fallback("attention", err)
        return cpu.attention(inputs, flags)


def attention_backward(grad_out: Tensor, inputs: ref.AttnInputs, flags: ref.AttnFlags) -> tuple[Tensor, Tensor, Tensor]:
    """FA2 backward kernels; the forward is recomputed for its output and log-sum-exp (the op saves neither yet)."""
    from .attention_bwd import attention_backward_triton
    from .attention_fwd import attention_forward_triton

    try:
        out, lse = attention_forward_triton(inputs, flags)
        return attention_backward_triton(grad_out, inputs, flags, out, lse)
    except ValueError as err:
        _fallback("attention_backward", err)
        return ref.attention_backward(grad_out, inputs, flags)


def norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float, weight_offset: float,
    rms: bool,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(normalized, x + residual or None)."""
    from .norm_kernels import norm_forward_triton

    try:
        y, total, _, _ = norm_forward_triton(x, weight, bias, residual, eps, weight_offset, rms)
        return y, total
    except ValueError as err:
        _fallback("rms_norm" if rms else "layer_norm", err)
        total = x + residual if residual is not None else None
        source = total if total is not None else x
        return cpu.norm(source, weight, bias, eps, weight_offset, rms), total


def norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, weight_offset: float, rms: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    from .norm_kernels import norm_backward_triton

    _, mean, rstd = ref.norm_forward(x, weight, None, eps, weight_offset, rms)
    try:
        return norm_backward_triton(grad, x, weight, None if rms else mean, rstd, weight_offset, rms)
    except ValueError as err:
        _fallback("norm_backward", err)
        return ref.norm_backward(grad, x, weight, mean, rstd, weight_offset, rms)


def rope(x: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int) -> Tensor:
    from .rope_kernels import rope_forward_triton

    try:
        return rope_forward_triton(x, cos, sin, layout, rotary_dim)
    except ValueError as err:
        _fallback("rope", err)
        return ref.rope_forward(x, cos, sin, layout, rotary_dim)
