"""The `tilefuse::*` custom ops that rewritten graphs call, with fake kernels and autograd.

Each op is defined from its argument record (codegen/op_schema.py), and every implementation, fake and autograd
rule here binds the op's arguments by name through that record. The reference implementation
(codegen/reference.py) defines each op; CPU tensors run the same function through torch's fused CPU kernels where
possible (codegen/cpu.py); the Triton kernels plug in behind the same ops for CUDA tensors (cuda_kernels.py, through
the `*_impl` factories here). Backward passes are ops of their own, so a traced backward graph holds one fused call
per site instead of the unfused chain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.library import CustomOpDef

from ..specs import ROPE_NONE, eps_mode_name
from . import cpu
from . import reference as ref
from .attention_args import check_attention_mask, mask_dtype_problem
from .layouts import empty_in_order, in_order
from .op_schema import (
    ATTENTION,
    ATTENTION_BACKWARD,
    GRAD_INPUTS,
    NORM_BACKWARD,
    ROPE,
    ROPE_BACKWARD,
    AttnFlags,
    AttnInputs,
    NormArgs,
    OpSignature,
    RopeArgs,
    attention_records,
    norm_op,
    pick,
)

# tilefuse::attention_backward's outputs: dq, dk, dv, dmask, dalibi_slopes, dcos, dsin.
AttnGradOutputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
# (inputs, flags, out_order) -> (out, lse); a kernel may write out in out_order already.
AttentionKernel = Callable[[AttnInputs, AttnFlags, Sequence[int] | None], tuple[Tensor, Tensor]]
# (grad_out, inputs, flags, out, lse, wanted, grad_lse) -> gradients
AttentionGradKernel = Callable[
    [Tensor, AttnInputs, AttnFlags, Tensor, Tensor, Sequence[bool], Tensor | None], ref.AttnGrads
]
NormKernel = Callable[[NormArgs, bool], tuple[Tensor, Tensor | None]]  # (args, rms) -> (y, x + residual or None)
# -> (dx, dweight or None, dbias or None: RMSNorm has no bias)
NormGradKernel = Callable[[Tensor, NormArgs, bool], tuple[Tensor, Tensor | None, Tensor | None]]


def define(op: OpSignature, impl: Callable[..., Any]) -> CustomOpDef:
    """Register `op` under its record's schema, with `impl` (taking the op's arguments) for every device."""
    return torch.library.custom_op(op.qualname, impl, mutates_args=(), schema=op.schema())


def _contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Every op returns contiguous tensors, as its fake kernel promises, whatever the input strides."""
    return tuple(t.contiguous() for t in tensors)


# ------------------------------------------------------------------------------------------------ attention


def attention_impl(kernel: AttentionKernel) -> Callable[..., tuple[Tensor, Tensor]]:
    """tilefuse::attention running `kernel`: fused attention on [B, H, N, D] tensors (see AttentionSpec).

    Returns (out, lse): lse is the fp32 [B, Hq, Nq] natural-log log-sum-exp of each row's masked scores (-inf
    for fully masked rows), saved for the backward. lse is differentiable (attention sinks rescale out by a
    function of it): a gradient reaching it goes to the backward as `grad_lse`. With dropout_p > 0, `rng` is the
    int64 [seed, offset] the keep mask is drawn from (reference.dropout_keep); the backward reads the same rng,
    so it drops the same probabilities. `out_order` lays out out's dims in memory, outermost first (None:
    contiguous), as the node the op replaces had them (codegen/layouts.py); lse is contiguous.
    """

    def attention(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        call = ATTENTION.bind(args, kwargs)
        out, lse = kernel(*attention_records(call), call["out_order"])
        return in_order(out, call["out_order"]), lse.contiguous()

    return attention


def _attention_cpu(inputs: AttnInputs, flags: AttnFlags, out_order: Sequence[int] | None) -> tuple[Tensor, Tensor]:
    return cpu.attention_with_lse(inputs, flags)  # laid out in out_order afterwards


attention = define(ATTENTION, attention_impl(_attention_cpu))


@attention.register_fake
def _attention_fake(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    call = ATTENTION.bind(args, kwargs)
    q, k, v, mask = (call[name] for name in ("q", "k", "v", "mask"))
    if mask is not None:  # a bad mask fails the compile (then the graph runs unfused), not the run
        problem = mask_dtype_problem(mask.dtype)
        if problem is not None:
            raise TypeError(problem)
        if all(isinstance(n, int) for n in (*q.shape, *k.shape, *mask.shape)):  # symbolic sizes: checked at run time
            check_attention_mask(mask, q.shape[:3], k.shape[2])
    out_shape = (*q.shape[:-1], v.shape[-1])
    out = empty_in_order(out_shape, call["out_order"], dtype=torch.result_type(q, v), device=q.device)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


def attention_backward_impl(kernel: AttentionGradKernel) -> Callable[..., AttnGradOutputs]:
    """tilefuse::attention_backward running `kernel`: (dq, dk, dv, dmask, dalibi_slopes, dcos, dsin) of
    tilefuse::attention, given its (out, lse).

    `input_grads` flags which of (mask, alibi_slopes, cos, sin) want a gradient (None: none); each of the last
    four is an empty tensor unless it is flagged and present. `grad_lse` is the gradient reaching lse (None when
    nothing downstream reads it, the common case; attention sinks do).
    """

    def attention_backward(*args: Any, **kwargs: Any) -> AttnGradOutputs:
        call = ATTENTION_BACKWARD.bind(args, kwargs)
        inputs, flags = attention_records(call)
        wanted = extra_grads_wanted(call["input_grads"])
        grads = kernel(call["grad_out"], inputs, flags, call["out"], call["lse"], wanted, call["grad_lse"])
        return attention_grad_outputs(grads, inputs.q)

    return attention_backward


def _attention_grads_cpu(
    grad_out: Tensor, inputs: AttnInputs, flags: AttnFlags, out: Tensor, lse: Tensor, wanted: Sequence[bool],
    grad_lse: Tensor | None,
) -> ref.AttnGrads:  # fmt: skip
    return ref.attention_grads(grad_out, inputs, flags, wanted, grad_lse)  # recomputes P instead of reading lse


attention_backward = define(ATTENTION_BACKWARD, attention_backward_impl(_attention_grads_cpu))


def extra_grads_wanted(input_grads: list[bool] | None) -> tuple[bool, bool, bool, bool]:
    """attention_backward's `input_grads` as the reference's `wanted` flags (mask, alibi_slopes, cos, sin)."""
    if input_grads is None:
        return ref.NO_EXTRA_GRADS
    if len(input_grads) != 4:
        raise ValueError(f"input_grads flags (mask, alibi_slopes, cos, sin): 4 bools, got {input_grads}")
    return (bool(input_grads[0]), bool(input_grads[1]), bool(input_grads[2]), bool(input_grads[3]))


def attention_grad_outputs(grads: ref.AttnGrads, q: Tensor) -> AttnGradOutputs:
    """The backward op's seven contiguous outputs, the gradients of GRAD_INPUTS; an empty tensor (one each: outputs
    may not alias) stands for a gradient not computed."""
    named = grads._asdict()
    dq, dk, dv, d_mask, d_slopes, d_cos, d_sin = (
        (g if g is not None else q.new_empty((0,))).contiguous() for g in (named[name] for name in GRAD_INPUTS)
    )
    return dq, dk, dv, d_mask, d_slopes, d_cos, d_sin


@attention_backward.register_fake
def _attention_backward_fake(*args: Any, **kwargs: Any) -> AttnGradOutputs:
    call = ATTENTION_BACKWARD.bind(args, kwargs)
    inputs = pick(AttnInputs, call)
    q, k, v, mask, cos, sin = inputs.q, inputs.k, inputs.v, inputs.mask, inputs.cos, inputs.sin
    rotary = cos is not None and sin is not None and call["rope_layout"] != ROPE_NONE
    float_mask = mask if mask is not None and mask.dtype != torch.bool else None
    extras = (float_mask, inputs.alibi_slopes, cos if rotary else None, sin if rotary else None)
    wanted = extra_grads_wanted(call["input_grads"])
    fakes = [t.new_empty(t.shape) if t is not None and want else None for t, want in zip(extras, wanted, strict=True)]
    grads = ref.AttnGrads(q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *fakes)
    return attention_grad_outputs(grads, q)


# The inputs besides q, k, v that may take a gradient, in the order of attention_backward's `input_grads`.
_EXTRA_GRAD_INPUTS = GRAD_INPUTS[3:]


def _attention_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    call = ATTENTION.bind(inputs)
    out, lse = output
    ctx.set_materialize_grads(False)  # an lse nothing reads gets no gradient: the backward then skips dlse
    ctx.save_for_backward(*pick(AttnInputs, call), out, lse)
    ctx.flags = pick(AttnFlags, call)


def _attention_grad(ctx: Any, grad_out: Tensor | None, grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    *tensors, out, lse = ctx.saved_tensors
    inputs = AttnInputs(*tensors)
    needs = ATTENTION.by_name(ctx.needs_input_grad)
    wanted = [bool(needs[name]) for name in _EXTRA_GRAD_INPUTS]  # asked for only when they need it
    if grad_out is None:  # only lse is read downstream
        grad_out = torch.zeros_like(out)
    grads = attention_backward(
        *ATTENTION_BACKWARD.call_args(
            inputs, ctx.flags, grad_out=grad_out, out=out, lse=lse, input_grads=wanted if any(wanted) else None,
            grad_lse=grad_lse,
        )
    )  # fmt: skip
    named: dict[str, Tensor | None] = dict(zip(GRAD_INPUTS, grads, strict=True))
    named.update({name: None for name, want in zip(_EXTRA_GRAD_INPUTS, wanted, strict=True) if not want})
    return ATTENTION.per_arg(named)  # the scalars, rng and out_order take no gradient


attention.register_autograd(_attention_grad, setup_context=_attention_setup)

# ----------------------------------------------------------------------------------------------------- RoPE
RopeKernel = Callable[[Tensor, Tensor, Tensor, int, int, Sequence[int] | None], Tensor]


def rope_impl(kernel: RopeKernel) -> Callable[..., Tensor]:
    """tilefuse::rope running `kernel`: rotary embedding of the first `rotary_dim` features of x (layout 0:
    rotate-half, 1: interleaved); the output laid out in `out_order` (None: contiguous), as the replaced node was
    (codegen/layouts.py)."""

    def rope(*args: Any, **kwargs: Any) -> Tensor:
        call = ROPE.bind(args, kwargs)
        return in_order(kernel(*pick(RopeArgs, call), call["out_order"]), call["out_order"])

    return rope


def _rope_cpu(
    x: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, out_order: Sequence[int] | None
) -> Tensor:
    return ref.rope_forward(x, cos, sin, layout, rotary_dim)  # laid out in out_order afterwards


rope = define(ROPE, rope_impl(_rope_cpu))


@rope.register_fake
def _rope_fake(*args: Any, **kwargs: Any) -> Tensor:
    call = ROPE.bind(args, kwargs)
    x, cos = call["x"], call["cos"]
    return empty_in_order(x.shape, call["out_order"], dtype=torch.result_type(x, cos), device=x.device)


def rope_backward_impl(kernel: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """tilefuse::rope_backward running `kernel`, which takes the op's arguments by their names."""

    def rope_backward(*args: Any, **kwargs: Any) -> Tensor:
        return kernel(**ROPE_BACKWARD.bind(args, kwargs)).contiguous()

    return rope_backward


rope_backward = define(ROPE_BACKWARD, rope_backward_impl(ref.rope_backward))


@rope_backward.register_fake
def _rope_backward_fake(*args: Any, **kwargs: Any) -> Tensor:
    call = ROPE_BACKWARD.bind(args, kwargs)
    return call["grad"].new_empty(call["grad"].shape, dtype=call["x_dtype"])


def _rope_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    args = pick(RopeArgs, ROPE.bind(inputs))
    needs = ROPE.by_name(ctx.needs_input_grad)
    tables_need_grad = needs["cos"] or needs["sin"]
    ctx.save_for_backward(args.cos, args.sin, args.x if tables_need_grad else None)  # x only for learned cos/sin
    ctx.layout, ctx.rotary_dim, ctx.x_dtype = args.layout, args.rotary_dim, args.x.dtype


def _rope_grad(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    cos, sin, x = ctx.saved_tensors
    needs = ROPE.by_name(ctx.needs_input_grad)
    grads = {"x": rope_backward(grad, cos, sin, ctx.layout, ctx.rotary_dim, ctx.x_dtype) if needs["x"] else None}
    if x is not None:  # learned tables are rare: their gradient stays unfused torch ops in the traced backward
        d_cos, d_sin = ref.rope_table_grads(grad, x, ctx.layout, ctx.rotary_dim, cos.shape, sin.shape)
        grads["cos"] = d_cos.to(cos.dtype) if needs["cos"] else None
        grads["sin"] = d_sin.to(sin.dtype) if needs["sin"] else None
    return ROPE.per_arg(grads)


rope.register_autograd(_rope_grad, setup_context=_rope_setup)

# ----------------------------------------------------------------------------------------------------- norms
# rms_norm: x · rsqrt(mean(x²) + eps) · (weight + weight_offset), `eps_mode` (an index into specs.EPS_MODES) and
# `norm_scale` placing eps as NormSpec says (F.normalize clamps the norm, ...); layer_norm: (x - mean) ·
# rsqrt(var + eps) · weight + bias. Statistics in fp32 over the last axis. add_*: s = x + residual; returns
# (norm(s), s). norm_backward: (dx, dweight, dbias), statistics recomputed from x; dweight is empty without weight.


def norm_impl(rms: bool, residual: bool, kernel: NormKernel) -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
    """The norm op `norm_op(rms, residual)` running `kernel`."""
    op = norm_op(rms, residual)

    def norm(*args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
        y, total = kernel(pick(NormArgs, op.bind(args, kwargs)), rms)
        if not residual:
            return y.contiguous()
        assert total is not None  # residual was given
        return y.contiguous(), total.contiguous()

    return norm


def _norm_cpu(args: NormArgs, rms: bool) -> tuple[Tensor, Tensor | None]:
    total = (args.x + args.residual).contiguous() if args.residual is not None else None
    x = total if total is not None else args.x
    mode = eps_mode_name(args.eps_mode)
    return cpu.norm(x, args.weight, args.bias, float(args.eps), args.weight_offset, rms, mode, args.norm_scale), total


def norm_backward_impl(kernel: NormGradKernel) -> Callable[..., tuple[Tensor, ...]]:
    """tilefuse::norm_backward running `kernel`."""

    def norm_backward(*args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        call = NORM_BACKWARD.bind(args, kwargs)
        x = call["x"]
        dx, dweight, dbias = kernel(call["grad"], pick(NormArgs, call), call["rms"])
        # The schema returns a dbias tensor of the width; RMSNorm has no bias, so its slot is zeros (no kernel work).
        dbias = dbias.to(x.dtype) if dbias is not None else x.new_zeros(x.shape[-1:])
        return _contiguous(dx, dweight if dweight is not None else x.new_empty((0,)), dbias)

    return norm_backward


def _norm_grads_cpu(grad: Tensor, args: NormArgs, rms: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    x, weight, eps, mode = args.x, args.weight, float(args.eps), eps_mode_name(args.eps_mode)
    _, mean, rstd = ref.norm_forward(x, weight, None, eps, args.weight_offset, rms, mode, args.norm_scale)
    return ref.norm_backward(grad, x, weight, mean, rstd, args.weight_offset, rms, eps, mode, args.norm_scale)


norm_backward = define(NORM_BACKWARD, norm_backward_impl(_norm_grads_cpu))


@norm_backward.register_fake
def _norm_backward_fake(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    call = NORM_BACKWARD.bind(args, kwargs)
    x, weight = call["x"], call["weight"]
    dweight = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    return x.new_empty(x.shape), dweight, x.new_empty(x.shape[-1:])


def _norm_out_fake(x: Tensor, *params: Tensor | None) -> Tensor:
    return x.new_empty(x.shape, dtype=ref.norm_out_dtype(x, *params))


def _norm_fake(op: OpSignature) -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
    def fake(*args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
        norm = pick(NormArgs, op.bind(args, kwargs))
        if norm.residual is None:
            return _norm_out_fake(norm.x, norm.weight, norm.bias)
        total = norm.x.new_empty(norm.x.shape, dtype=torch.result_type(norm.x, norm.residual))
        return _norm_out_fake(total, norm.weight, norm.bias), total

    return fake


def _norm_setup(op: OpSignature) -> Callable[[Any, tuple[Any, ...], Any], None]:
    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        norm = pick(NormArgs, op.bind(inputs))
        residual = norm.residual is not None
        ctx.save_for_backward(output[1] if residual else norm.x, norm.weight)  # the norm's input: x (+ residual)
        ctx.has_weight = norm.weight is not None
        ctx.bias_dtype = norm.bias.dtype if norm.bias is not None else None
        ctx.scalars = pick(NormArgs, {k: v for k, v in norm._asdict().items() if not isinstance(v, Tensor)})
        ctx.input_dtypes = {name: t.dtype for name, t in (("x", norm.x), ("residual", norm.residual)) if t is not None}

    return setup


def _norm_grad(op: OpSignature, rms: bool) -> Callable[..., tuple[Tensor | None, ...]]:
    def grad_fn(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        call = NORM_BACKWARD.call_args(ctx.scalars, grad=grads[0], x=x, weight=weight, rms=rms)
        dx, dweight, dbias = norm_backward(*call)
        if len(grads) > 1 and grads[1] is not None:  # the sum output's gradient reaches x and residual too
            dx = dx + grads[1]
        named = {name: dx.to(dtype) for name, dtype in ctx.input_dtypes.items()}
        named["weight"] = dweight if ctx.has_weight else None
        named["bias"] = dbias.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return op.per_arg(named)  # eps and the other scalars take no gradient

    return grad_fn


def _define_norm(rms: bool, residual: bool) -> CustomOpDef:
    op = norm_op(rms, residual)
    norm = define(op, norm_impl(rms, residual, _norm_cpu))
    norm.register_fake(_norm_fake(op))
    norm.register_autograd(_norm_grad(op, rms), setup_context=_norm_setup(op))
    return norm


rms_norm = _define_norm(rms=True, residual=False)
layer_norm = _define_norm(rms=False, residual=False)
add_rms_norm = _define_norm(rms=True, residual=True)
add_layer_norm = _define_norm(rms=False, residual=True)
