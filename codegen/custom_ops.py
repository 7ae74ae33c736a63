"""The `tilefuse::*` custom ops that rewritten graphs call, with fake kernels and autograd.

Each op has a reference implementation (codegen/reference.py) that defines it; CPU tensors run the same function
through torch's fused CPU kernels where possible (codegen/cpu.py); the Triton kernels plug in behind the same ops
for CUDA tensors. Backward passes are ops of their own, so a traced backward graph holds one
fused call per site instead of the unfused chain.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.types import Number

from ..specs import eps_mode_name
from . import cpu
from . import reference as ref
from .attention_args import check_attention_mask, mask_dtype_problem
from .layouts import empty_in_order, in_order

# Attention dropout's rng is int64 [seed, offset] drawn uniformly from [0, RNG_HIGH): below 2^31, so a kernel can
# take either as int32 or int64, and offset + counter never overflows int64.
RNG_HIGH = 2**31 - 1

# tilefuse::attention_backward's outputs: dq, dk, dv, dmask, dalibi_slopes, dcos, dsin.
AttnGradOutputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Every op returns contiguous tensors, as its fake kernel promises, whatever the input strides."""
    return tuple(t.contiguous() for t in tensors)


# Scalar arguments (attention scale and softcap, norm eps) are `Number` (schema `Scalar`), not `float`: a compiled
# graph may pass a value computed from symbolic sizes, which a `float` argument would specialize (one recompile
# per value); the implementations convert it to a Python float first.

# ------------------------------------------------------------------------------------------------ attention


def _flags(scale: Number, causal: bool, bottom_right: bool, window: int, softcap: Number, rope_layout: int,
           rotary_dim: int, dropout_p: float) -> ref.AttnFlags:  # fmt: skip
    return ref.AttnFlags(float(scale), causal, bottom_right, window, float(softcap), rope_layout, rotary_dim,
                         dropout_p)  # fmt: skip


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    scale: Number,
    causal: bool,
    bottom_right: bool,
    window: int,
    softcap: Number,
    rope_layout: int,
    rotary_dim: int,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
    out_order: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused attention on [B, H, N, D] tensors; see AttentionSpec for the semantics of each argument.

    Returns (out, lse): lse is the fp32 [B, Hq, Nq] natural-log log-sum-exp of each row's masked scores (-inf
    for fully masked rows), saved for the backward. lse is differentiable (attention sinks rescale out by a
    function of it): a gradient reaching it goes to the backward as `grad_lse`. With dropout_p > 0, `rng` is the
    int64 [seed, offset] the keep mask is drawn from (reference.dropout_keep); the backward reads the same rng,
    so it drops the same probabilities. `out_order` lays out out's dims in memory, outermost first (None:
    contiguous), as the node the op replaces had them (codegen/layouts.py); lse is contiguous.
    """
    inputs = ref.AttnInputs(q, k, v, mask, alibi_slopes, cos, sin, rng)
    flags = _flags(scale, causal, bottom_right, window, softcap, rope_layout, rotary_dim, dropout_p)
    out, lse = cpu.attention_with_lse(inputs, flags)
    return in_order(out, out_order), lse.contiguous()


attention = torch.library.custom_op("tilefuse::attention", mutates_args=())(_attention)
_ATTENTION_SIGNATURE = inspect.signature(_attention)


@attention.register_fake
def _attention_fake(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """Output metadata, by the op's own signature (bound by name, so the argument list is written once)."""
    bound = _ATTENTION_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    q, k, v, mask = (bound.arguments[name] for name in ("q", "k", "v", "mask"))
    out_order = bound.arguments["out_order"]
    if mask is not None:  # a bad mask fails the compile (then the graph runs unfused), not the run
        problem = mask_dtype_problem(mask.dtype)
        if problem is not None:
            raise TypeError(problem)
        if all(isinstance(n, int) for n in (*q.shape, *k.shape, *mask.shape)):  # symbolic sizes: checked at run time
            check_attention_mask(mask, q.shape[:3], k.shape[2])
    out = empty_in_order((*q.shape[:-1], v.shape[-1]), out_order, dtype=torch.result_type(q, v), device=q.device)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tilefuse::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: Number,
    causal: bool,
    bottom_right: bool,
    window: int,
    softcap: Number,
    rope_layout: int,
    rotary_dim: int,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
    input_grads: list[bool] | None = None,
    grad_lse: Tensor | None = None,
) -> AttnGradOutputs:
    """(dq, dk, dv, dmask, dalibi_slopes, dcos, dsin) of tilefuse::attention, given its (out, lse).

    `input_grads` flags which of (mask, alibi_slopes, cos, sin) want a gradient (None: none); each of the last
    four is an empty tensor unless it is flagged and present. `grad_lse` is the gradient reaching lse (None when
    nothing downstream reads it, the common case; attention sinks do). The CPU reference recomputes P instead
    of reading (out, lse).
    """
    inputs = ref.AttnInputs(q, k, v, mask, alibi_slopes, cos, sin, rng)
    flags = _flags(scale, causal, bottom_right, window, softcap, rope_layout, rotary_dim, dropout_p)
    wanted = extra_grads_wanted(input_grads)
    return attention_grad_outputs(ref.attention_grads(grad_out, inputs, flags, wanted, grad_lse), q)


def extra_grads_wanted(input_grads: list[bool] | None) -> tuple[bool, bool, bool, bool]:
    """attention_backward's `input_grads` as the reference's `wanted` flags (mask, alibi_slopes, cos, sin)."""
    if input_grads is None:
        return ref.NO_EXTRA_GRADS
    if len(input_grads) != 4:
        raise ValueError(f"input_grads flags (mask, alibi_slopes, cos, sin): 4 bools, got {input_grads}")
    return (bool(input_grads[0]), bool(input_grads[1]), bool(input_grads[2]), bool(input_grads[3]))


def attention_grad_outputs(grads: ref.AttnGrads, q: Tensor) -> AttnGradOutputs:
    """The backward op's seven contiguous outputs; an empty tensor (one each: outputs may not alias) stands for a
    gradient not computed."""
    dq, dk, dv, *extras = ((g if g is not None else q.new_empty((0,))).contiguous() for g in grads)
    d_mask, d_slopes, d_cos, d_sin = extras
    return dq, dk, dv, d_mask, d_slopes, d_cos, d_sin


@attention_backward.register_fake
def _attention_backward_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, alibi_slopes: Tensor | None,
    cos: Tensor | None, sin: Tensor | None, out: Tensor, lse: Tensor, scale: Number, causal: bool,
    bottom_right: bool, window: int, softcap: Number, rope_layout: int, rotary_dim: int, dropout_p: float = 0.0,
    rng: Tensor | None = None, input_grads: list[bool] | None = None, grad_lse: Tensor | None = None,
) -> AttnGradOutputs:  # fmt: skip
    rotary = cos is not None and sin is not None and rope_layout != ref.ROPE_NONE
    float_mask = mask if mask is not None and mask.dtype != torch.bool else None
    extras = (float_mask, alibi_slopes, cos if rotary else None, sin if rotary else None)
    wanted = extra_grads_wanted(input_grads)
    fakes = [t.new_empty(t.shape) if t is not None and want else None for t, want in zip(extras, wanted, strict=True)]
    grads = ref.AttnGrads(q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *fakes)
    return attention_grad_outputs(grads, q)


def _attention_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, mask, alibi, cos, sin = inputs[:7]
    out, lse = output
    ctx.set_materialize_grads(False)  # an lse nothing reads gets no gradient: the backward then skips dlse
    ctx.save_for_backward(q, k, v, mask, alibi, cos, sin, out, lse, inputs[15])
    ctx.flags = inputs[7:15]  # scale ... rotary_dim, dropout_p


def _attention_grad(ctx: Any, grad_out: Tensor | None, grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, mask, alibi, cos, sin, out, lse, rng = ctx.saved_tensors
    wanted = tuple(ctx.needs_input_grad[3:7])  # mask, alibi_slopes, cos, sin: asked for only when they need it
    input_grads = list(wanted) if any(wanted) else None
    if grad_out is None:  # only lse is read downstream
        grad_out = torch.zeros_like(out)
    grads = attention_backward(grad_out, q, k, v, mask, alibi, cos, sin, out, lse, *ctx.flags, rng, input_grads,
                               grad_lse)  # fmt: skip
    extras = tuple(g if want else None for g, want in zip(grads[3:], wanted, strict=True))
    return (*grads[:3], *extras) + (None,) * 10  # scale ... dropout_p, rng, out_order take no gradient


attention.register_autograd(_attention_grad, setup_context=_attention_setup)

# ----------------------------------------------------------------------------------------------------- RoPE


@torch.library.custom_op("tilefuse::rope", mutates_args=())
def rope(
    x: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, out_order: list[int] | None = None
) -> Tensor:
    """Rotary embedding of the first `rotary_dim` features of x (layout 0: rotate-half, 1: interleaved); the output
    laid out in `out_order` (None: contiguous), as the replaced node was (codegen/layouts.py)."""
    return in_order(ref.rope_forward(x, cos, sin, layout, rotary_dim), out_order)


@rope.register_fake
def _rope_fake(
    x: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, out_order: list[int] | None = None
) -> Tensor:
    return empty_in_order(x.shape, out_order, dtype=torch.result_type(x, cos), device=x.device)


@torch.library.custom_op("tilefuse::rope_backward", mutates_args=())
def rope_backward(grad: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, x_dtype: torch.dtype) -> Tensor:
    return ref.rope_backward(grad, cos, sin, layout, rotary_dim, x_dtype).contiguous()


@rope_backward.register_fake
def _rope_backward_fake(
    grad: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, x_dtype: torch.dtype
) -> Tensor:
    return grad.new_empty(grad.shape, dtype=x_dtype)


def _rope_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, cos, sin, layout, rotary_dim = inputs[:5]  # then out_order
    tables_need_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(cos, sin, x if tables_need_grad else None)  # x only for learned cos/sin
    ctx.layout, ctx.rotary_dim, ctx.x_dtype = layout, rotary_dim, x.dtype


def _rope_grad(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    cos, sin, x = ctx.saved_tensors
    need_x, need_cos, need_sin = ctx.needs_input_grad[:3]
    dx = rope_backward(grad, cos, sin, ctx.layout, ctx.rotary_dim, ctx.x_dtype) if need_x else None
    if x is None:
        return dx, None, None, None, None, None
    # Learned tables are rare: their gradient stays unfused torch ops in the traced backward.
    d_cos, d_sin = ref.rope_table_grads(grad, x, ctx.layout, ctx.rotary_dim, cos.shape, sin.shape)
    return dx, d_cos.to(cos.dtype) if need_cos else None, d_sin.to(sin.dtype) if need_sin else None, None, None, None


rope.register_autograd(_rope_grad, setup_context=_rope_setup)

# ----------------------------------------------------------------------------------------------------- norms


@torch.library.custom_op("tilefuse::rms_norm", mutates_args=())
def rms_norm(
    x: Tensor, weight: Tensor | None, eps: Number, weight_offset: float, eps_mode: int = 0, norm_scale: float = 1.0
) -> Tensor:
    """x · rsqrt(mean(x²) + eps) · (weight + weight_offset), statistics in fp32; `eps_mode` (an index into
    specs.EPS_MODES) and `norm_scale` place eps as NormSpec says (F.normalize clamps the norm, ...)."""
    mode = eps_mode_name(eps_mode)
    return cpu.norm(x, weight, None, float(eps), weight_offset, True, mode, norm_scale).contiguous()


@torch.library.custom_op("tilefuse::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: Number) -> Tensor:
    """(x - mean) · rsqrt(var + eps) · weight + bias over the last axis, statistics in fp32."""
    return cpu.norm(x, weight, bias, float(eps), 0.0, rms=False).contiguous()


@torch.library.custom_op("tilefuse::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: Number, weight_offset: float, eps_mode: int = 0,
    norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """s = x + residual; returns (rms_norm(s), s)."""
    total = (x + residual).contiguous()
    mode = eps_mode_name(eps_mode)
    return cpu.norm(total, weight, None, float(eps), weight_offset, True, mode, norm_scale).contiguous(), total


@torch.library.custom_op("tilefuse::add_layer_norm", mutates_args=())
def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: Number
) -> tuple[Tensor, Tensor]:
    """s = x + residual; returns (layer_norm(s), s)."""
    total = (x + residual).contiguous()
    return cpu.norm(total, weight, bias, float(eps), 0.0, rms=False).contiguous(), total


@torch.library.custom_op("tilefuse::norm_backward", mutates_args=())
def norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: Number, weight_offset: float, rms: bool, eps_mode: int = 0,
    norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dweight, dbias); statistics are recomputed from x. dweight is empty when there is no weight."""
    mode = eps_mode_name(eps_mode)
    _, mean, rstd = ref.norm_forward(x, weight, None, float(eps), weight_offset, rms, mode, norm_scale)
    dx, dweight, dbias = ref.norm_backward(grad, x, weight, mean, rstd, weight_offset, rms, float(eps), mode,
                                           norm_scale)  # fmt: skip
    empty = x.new_empty((0,))
    return _contiguous(dx, dweight if dweight is not None else empty, dbias.to(x.dtype))  # type: ignore[return-value]


def _norm_out_fake(x: Tensor, *params: Tensor | None) -> Tensor:
    dtype = x.dtype
    for p in params:
        if p is not None:
            dtype = torch.promote_types(dtype, p.dtype)
    return x.new_empty(x.shape, dtype=dtype)


@rms_norm.register_fake
def _rms_norm_fake(
    x: Tensor, weight: Tensor | None, eps: Number, weight_offset: float, eps_mode: int = 0, norm_scale: float = 1.0
) -> Tensor:
    return _norm_out_fake(x, weight)


@layer_norm.register_fake
def _layer_norm_fake(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: Number) -> Tensor:
    return _norm_out_fake(x, weight, bias)


@add_rms_norm.register_fake
def _add_rms_norm_fake(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: Number, weight_offset: float, eps_mode: int = 0,
    norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    total = x.new_empty(x.shape, dtype=torch.result_type(x, residual))
    return _norm_out_fake(total, weight), total


@add_layer_norm.register_fake
def _add_layer_norm_fake(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: Number
) -> tuple[Tensor, Tensor]:
    total = x.new_empty(x.shape, dtype=torch.result_type(x, residual))
    return _norm_out_fake(total, weight, bias), total


@norm_backward.register_fake
def _norm_backward_fake(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: Number, weight_offset: float, rms: bool, eps_mode: int = 0,
    norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    dweight = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    return x.new_empty(x.shape), dweight, x.new_empty(x.shape[-1:])


def _norm_param_grads(ctx: Any, dweight: Tensor, dbias: Tensor) -> tuple[Tensor | None, Tensor | None]:
    dw = dweight if ctx.has_weight else None
    db = dbias.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dw, db


def _norm_setup(rms: bool, residual: bool) -> Any:
    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x = output[1] if residual else inputs[0]
        weight = inputs[2] if residual else inputs[1]
        bias = None if rms else inputs[3 if residual else 2]
        ctx.save_for_backward(x, weight)
        ctx.has_weight = weight is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        scalars = inputs[3 if residual else 2 :] if rms else (inputs[-1], 0.0, 0, 1.0)
        ctx.eps, ctx.weight_offset, ctx.eps_mode, ctx.norm_scale = scalars
        ctx.input_dtypes = (inputs[0].dtype, inputs[1].dtype) if residual else (inputs[0].dtype,)

    return setup


def _norm_grad(rms: bool, residual: bool) -> Any:
    def grad_fn(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dx, dweight, dbias = norm_backward(grads[0], x, weight, ctx.eps, ctx.weight_offset, rms, ctx.eps_mode,
                                           ctx.norm_scale)  # fmt: skip
        dw, db = _norm_param_grads(ctx, dweight, dbias)
        params: tuple[Tensor | None, ...] = (dw,) if rms else (dw, db)
        tail = (None,) * 4 if rms else (None,)  # eps (and weight_offset, eps_mode, norm_scale) take no gradient
        if not residual:
            return (dx.to(ctx.input_dtypes[0]), *params, *tail)
        total_grad = dx + grads[1] if grads[1] is not None else dx
        x_dtype, r_dtype = ctx.input_dtypes
        return (total_grad.to(x_dtype), total_grad.to(r_dtype), *params, *tail)

    return grad_fn


rms_norm.register_autograd(_norm_grad(True, False), setup_context=_norm_setup(True, False))
layer_norm.register_autograd(_norm_grad(False, False), setup_context=_norm_setup(False, False))
add_rms_norm.register_autograd(_norm_grad(True, True), setup_context=_norm_setup(True, True))
add_layer_norm.register_autograd(_norm_grad(False, True), setup_context=_norm_setup(False, True))
