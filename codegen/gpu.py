"""CUDA implementations of the fused ops: the Triton kernels, or the reference with a logged reason.

Each launcher raises ValueError for a case its kernel does not cover (RoPE inside attention, fp64, ...); the
op then runs the reference implementation on the GPU, so a site never fails for lack of a kernel. Every launch takes
the knobs chosen at compile time for its kernel family and launch key (codegen/launch_configs.py, which autotune
fills): one dict lookup, skipped when nothing was chosen; the launcher's defaults otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import cpu, launch_configs
from . import reference as ref
from .launch_configs import attention_key, norm_key, rope_key
from .layouts import inverse_order, permuted_rows
from .op_schema import GRAD_INPUTS
from .tile_config import RopeKnobs, TileConfig

log = logging.getLogger("tilefuse.codegen")


def _fallback(op: str, err: ValueError) -> None:
    log.debug("tilefuse::%s runs the reference implementation: %s", op, err)


def attention(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> Tensor:
    return attention_with_lse(inputs, flags)[0]


def attention_with_lse(
    inputs: ref.AttnInputs, flags: ref.AttnFlags, out_order: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """(out, lse) of split-KV decode for a few query rows over a long KV (`attention_decode.use_decode`), else of
    the FA2 forward, each at the tile config chosen at compile time (autotune registry) or its default; the
    reference when neither kernel covers the case. The kernels write out in `out_order` (codegen/layouts.py); the
    reference's out is contiguous."""
    from .attention_decode import attention_decode_triton, attention_triton

    try:
        kind, config = _attention_config(inputs, flags, backward=False)
        layout: dict[str, Any] = {} if out_order is None else {"out_order": out_order}
        if kind == "attention_decode" and config is not None:
            return attention_decode_triton(inputs, flags, **config.decode_knobs(), **layout)
        return attention_triton(inputs, flags, **(config.attention_knobs() if config is not None else {}), **layout)
    except ValueError as err:
        _fallback("attention", err)
        return cpu.attention_with_lse(inputs, flags)


def _attention_config(
    inputs: ref.AttnInputs, flags: ref.AttnFlags, backward: bool
) -> tuple[str | None, TileConfig | None]:
    """(kernel family, chosen config or None) of this attention launch; (None, None) when nothing was chosen."""
    q, k, v = inputs.q, inputs.k, inputs.v
    if not launch_configs.active() or q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[1] == 0:
        return None, None  # no config to find (or a shape the launcher rejects with a clear error)
    from .attention_decode import use_decode

    group = q.shape[1] // k.shape[1]
    if backward:
        kind = "attention_backward"
    else:
        decode = use_decode(q.shape[2], k.shape[2], group, max(q.shape[-1], v.shape[-1]))
        kind = "attention_decode" if decode else "attention"
    rope = inputs.cos is not None and inputs.sin is not None and flags.rope_layout != ref.ROPE_NONE
    key = attention_key(
        kind, q.shape[-1], v.shape[-1], q.dtype, group, q.shape[2], k.shape[2], flags.causal, flags.window > 0,
        flags.softcap > 0, inputs.alibi_slopes is not None, inputs.mask is not None, rope, flags.dropout_p > 0,
    )  # fmt: skip
    return kind, launch_configs.config_for_launch(key)


def attention_backward(
    grad_out: Tensor, inputs: ref.AttnInputs, flags: ref.AttnFlags, out: Tensor, lse: Tensor,
    grad_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """FA2 backward kernels from the forward's saved output and log-sum-exp (and the gradient reaching lse, if
    any); no forward is recomputed."""
    from .attention_bwd import attention_backward_triton

    try:
        _, config = _attention_config(inputs, flags, backward=True)
        knobs = config.attention_knobs() if config is not None else {}
        return attention_backward_triton(grad_out, inputs, flags, out, lse, grad_lse, **knobs)
    except ValueError as err:
        _fallback("attention_backward", err)
        return ref.attention_backward(grad_out, inputs, flags, grad_lse)


def attention_grads(
    grad_out: Tensor, inputs: ref.AttnInputs, flags: ref.AttnFlags, out: Tensor, lse: Tensor, wanted: Sequence[bool],
    grad_lse: Tensor | None = None,
) -> ref.AttnGrads:  # fmt: skip
    """attention_backward, plus the gradients of (mask, alibi_slopes, cos, sin) flagged in `wanted`.

    The Triton backward computes no bias or RoPE-table gradients yet, so a site that needs one runs the reference
    backward (told once per process).
    """
    if not any(wanted):
        return ref.AttnGrads(*attention_backward(grad_out, inputs, flags, out, lse, grad_lse))
    names = [name for name, want in zip(GRAD_INPUTS[3:], wanted, strict=True) if want]
    if not _TOLD_REFERENCE_GRADS.intersection(names):
        log.info("tilefuse::attention_backward runs the reference implementation where %s requires grad: the "
                 "Triton backward computes only dq, dk, dv", " and ".join(names))  # fmt: skip
        _TOLD_REFERENCE_GRADS.update(names)
    return ref.attention_grads(grad_out, inputs, flags, wanted, grad_lse)


_TOLD_REFERENCE_GRADS: set[str] = set()


def _norm_config(kind: str, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                 rms: bool) -> TileConfig | None:  # fmt: skip
    if not launch_configs.active() or x.dim() == 0 or x.shape[-1] == 0:
        return None

    width = x.shape[-1]
    key = norm_key(kind, rms, width, x.numel() // width, x.dtype, weight is not None, bias is not None,
                   residual is not None)  # fmt: skip
    return launch_configs.config_for_launch(key)


def norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float, weight_offset: float,
    rms: bool, eps_mode: str = "mean_square", norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(normalized, x + residual or None), at the warps and row block chosen at compile time (autotune registry) or
    the defaults."""
    from .norm_kernels import norm_forward_triton

    try:
        config = _norm_config("norm", x, weight, bias, residual, rms)
        knobs = config.norm_knobs() if config is not None else {}
        y, total, _, _ = norm_forward_triton(x, weight, bias, residual, eps, weight_offset, rms, **knobs,
                                             eps_mode=eps_mode, norm_scale=norm_scale)  # fmt: skip
        return y, total
    except ValueError as err:
        _fallback("rms_norm" if rms else "layer_norm", err)
        total = x + residual if residual is not None else None
        source = total if total is not None else x
        return cpu.norm(source, weight, bias, eps, weight_offset, rms, eps_mode, norm_scale), total


def norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, weight_offset: float, rms: bool,
    eps_mode: str = "mean_square", norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    from .norm_kernels import norm_backward_triton

    _, mean, rstd = ref.norm_forward(x, weight, None, eps, weight_offset, rms, eps_mode, norm_scale)
    try:
        config = _norm_config("norm_backward", x, weight, None, None, rms)
        knobs = {} if config is None else config.norm_backward_knobs()
        return norm_backward_triton(grad, x, weight, None if rms else mean, rstd, weight_offset, rms, **knobs,
                                    eps=eps, eps_mode=eps_mode, norm_scale=norm_scale)  # fmt: skip
    except ValueError as err:
        _fallback("norm_backward", err)
        return ref.norm_backward(grad, x, weight, mean, rstd, weight_offset, rms, eps, eps_mode, norm_scale)


def _rope_knobs(x: Tensor, layout: int, rotary_dim: int, dtype: torch.dtype) -> RopeKnobs:
    """block_rows and num_warps chosen at compile time for this RoPE launch (forward and backward share them)."""
    if not launch_configs.active() or x.dim() == 0 or x.shape[-1] == 0:
        return {}

    config = launch_configs.config_for_launch(
        rope_key(layout, x.shape[-1], rotary_dim, x.numel() // x.shape[-1], dtype)
    )
    return RopeKnobs() if config is None else config.rope_knobs()


def rope(
    x: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, out_order: Sequence[int] | None = None
) -> Tensor:
    """The RoPE kernel, on x's rows taken in `out_order` (the last dim innermost) so that its contiguous output is
    that layout with no copy (codegen/layouts.py); the reference where the kernel does not cover the case."""
    from .rope_kernels import rope_forward_triton

    if out_order is not None and list(out_order)[-1] == x.dim() - 1:  # rows stay rows: run on permuted views
        x, cos, sin = permuted_rows(out_order, x, cos, sin)
        return rope(x, cos, sin, layout, rotary_dim).permute(inverse_order(out_order))
    try:
        return rope_forward_triton(x, cos, sin, layout, rotary_dim, **_rope_knobs(x, layout, rotary_dim, x.dtype))
    except ValueError as err:
        _fallback("rope", err)
        return ref.rope_forward(x, cos, sin, layout, rotary_dim)


def rope_backward(grad: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, x_dtype: torch.dtype) -> Tensor:
    from .rope_kernels import rope_backward_triton

    try:
        knobs = _rope_knobs(grad, layout, rotary_dim, x_dtype)
        return rope_backward_triton(grad, cos, sin, layout, rotary_dim, x_dtype, **knobs)
    except ValueError as err:
        _fallback("rope_backward", err)
        return ref.rope_backward(grad, cos, sin, layout, rotary_dim, x_dtype)
