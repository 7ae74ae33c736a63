"""CUDA implementations of the fused ops: the Triton kernels, or the reference with a logged reason.

Each launcher raises ValueError for a case its kernel does not cover (RoPE inside attention, fp64, ...); the
op then runs the reference implementation on the GPU, so a site never fails for lack of a kernel.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from . import cpu
from . import reference as ref

log = logging.getLogger("tilefuse.codegen")


def _fallback(op: str, err: ValueError) -> None:
    log.debug("tilefuse::%s runs the reference implementation: %s", op, err)


def attention(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> Tensor:
    return attention_with_lse(inputs, flags)[0]


def attention_with_lse(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> tuple[Tensor, Tensor]:
    """(out, lse) of split-KV decode for a few query rows over a long KV (`attention_decode.use_decode`), else of
    the FA2 forward at the tile config chosen at compile time (autotune registry) or its default; the reference
    when neither kernel covers the case."""
    from .attention_decode import attention_triton

    try:
        return attention_triton(inputs, flags, **_tuned_config(inputs, flags))
    except ValueError as err:
        _fallback("attention", err)
        return cpu.attention_with_lse(inputs, flags)


def _tuned_config(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> dict[str, int]:
    from ..autotune import registry

    q, k, v = inputs.q, inputs.k, inputs.v
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[1] == 0:
        return {}  # the launcher raises the clear error
    rope = inputs.cos is not None and inputs.sin is not None and flags.rope_layout != ref.ROPE_NONE
    key = registry.launch_key(
        q.shape[-1], v.shape[-1], str(q.dtype), q.shape[1] // k.shape[1], q.shape[2], k.shape[2], flags.causal,
        flags.window > 0, flags.softcap > 0, inputs.alibi_slopes is not None, inputs.mask is not None, rope,
        flags.dropout_p > 0,
    )  # fmt: skip
    config = registry.config_for_launch(key)
    if config is None:
        return {}
    return dict(block_m=config.block_m, block_n=config.block_n, num_warps=config.num_warps,
                num_stages=config.num_stages)  # fmt: skip


def attention_backward(
    grad_out: Tensor, inputs: ref.AttnInputs, flags: ref.AttnFlags, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """FA2 backward kernels from the forward's saved output and log-sum-exp; no forward is recomputed."""
    from .attention_bwd import attention_backward_triton

    try:
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


def rope_backward(grad: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, x_dtype: torch.dtype) -> Tensor:
    from .rope_kernels import rope_backward_triton

    try:
        return rope_backward_triton(grad, cos, sin, layout, rotary_dim, x_dtype)
    except ValueError as err:
        _fallback("rope_backward", err)
        return ref.rope_backward(grad, cos, sin, layout, rotary_dim, x_dtype)
