"""The numerics protocol of the GPU tests, and the plain PyTorch math the kernels are judged against.

Each check runs one function three ways on the same inputs: ours (tilefuse) in the test dtype, the eager baseline
(plain PyTorch in the test dtype, as a user's model computes it) and the fp64 golden (that same plain math on fp64
copies, on the same device). Then err(ours) <= 2·err(eager) + floor for outputs and <= 3·err(eager) + floor for
gradients, err being the max abs difference to the golden and floor a few ulps of the dtype times max|golden| (the
protocol of tests/passes/_helpers.assert_no_worse_than_eager, extended to gradients); every output and gradient of
ours must also be finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0
FLOOR_ULPS = 4


# --------------------------------------------------------------------------------------------------- protocol
def max_err(x: Tensor, golden: Tensor) -> float:
    return (x.double() - golden.double()).abs().max().item() if x.numel() else 0.0


def rounding_floor(dtype: torch.dtype, golden: Tensor) -> float:
    scale = golden.abs().max().item() if golden.numel() else 0.0
    return FLOOR_ULPS * torch.finfo(dtype).eps * max(scale, 1e-3)


def assert_finite(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    bad = [name for name, t in zip(names, tensors, strict=True) if not torch.isfinite(t).all()]
    assert not bad, f"non-finite values in {bad}"


def assert_no_worse_than_eager(name: str, ours: Tensor, eager: Tensor, golden: Tensor, factor: float) -> None:
    assert ours.shape == eager.shape and ours.dtype == eager.dtype, (
        f"{name}: ours {ours.dtype}{tuple(ours.shape)} vs eager {eager.dtype}{tuple(eager.shape)}"
    )
    err_ours, err_eager = max_err(ours, golden), max_err(eager, golden)
    floor = rounding_floor(eager.dtype, golden)
    assert err_ours <= factor * err_eager + floor, (
        f"{name}: err(ours) {err_ours:.3g} > {factor:g}·err(eager) {err_eager:.3g} + floor {floor:.3g}"
    )


def as_fp64(value: Any) -> Any:
    """Floating tensors (also inside tuples, lists and dict values) as fp64 copies; everything else unchanged."""
    if isinstance(value, Tensor):
        return value.detach().double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(as_fp64(v) for v in value)
    if isinstance(value, dict):
        return {k: as_fp64(v) for k, v in value.items()}
    return value


def run(
    fn: Callable[..., Any],
    inputs: Sequence[Tensor],
    kwargs: dict[str, Any],
    backward: bool,
    grad_outs: Sequence[Tensor] | None = None,
    seed: int = 0,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(outputs, d(Σ out·grad_out)/d(inputs), grad_outs) of fn(*inputs, **kwargs); without `grad_outs` they are drawn
    (seeded) in each output's dtype. No gradients unless `backward`."""
    leaves = [t.detach().requires_grad_(backward) for t in inputs]
    result = fn(*leaves, **kwargs)
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    if not backward:
        return [o.detach() for o in outputs], [], []
    if grad_outs is None:
        gen = torch.Generator(device=outputs[0].device).manual_seed(seed)
        grad_outs = [torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype) for o in outputs]
    seeds = [g.to(o.dtype) for g, o in zip(grad_outs, outputs, strict=True)]
    grads = torch.autograd.grad(outputs, leaves, seeds)
    return [o.detach() for o in outputs], list(grads), list(grad_outs)


def check_against_golden(
    ours_fn: Callable[..., Any],
    eager_fn: Callable[..., Any],
    inputs: Sequence[Tensor],
    kwargs: dict[str, Any],
    names: tuple[Sequence[str], Sequence[str]],
    backward: bool = True,
) -> tuple[list[Tensor], list[Tensor]]:
    """The protocol for ours_fn against eager_fn: `names` = (output names, input names); returns ours (outputs,
    gradients). The golden gets fp64 copies of the inputs, of the tensors in kwargs and of ours' grad_outs."""
    ours_out, ours_grads, grad_outs = run(ours_fn, inputs, kwargs, backward)
    eager = run(eager_fn, inputs, kwargs, backward, grad_outs)
    golden = run(eager_fn, as_fp64(list(inputs)), as_fp64(kwargs), backward, as_fp64(grad_outs))
    out_names, in_names = names
    grad_names = [f"d{n}" for n in in_names] if backward else []
    assert_finite([*out_names, *grad_names], [*ours_out, *ours_grads])
    for labels, mine, base, gold, factor in (
        (out_names, ours_out, eager[0], golden[0], FORWARD_FACTOR),
        (grad_names, ours_grads, eager[1], golden[1], GRADIENT_FACTOR),
    ):
        for label, m, b, g in zip(labels, mine, base, gold, strict=True):
            assert_no_worse_than_eager(label, m, b, g, factor)
    return ours_out, ours_grads


# ------------------------------------------------------------------------------------------ eager reference math
def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_interleaved(x: Tensor) -> Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def eager_rope(x: Tensor, cos: Tensor, sin: Tensor, layout: str = "rotate_half", rotary_dim: int | None = None
               ) -> Tensor:  # fmt: skip
    """x·cos + R(x)·sin on the first rotary_dim features, in x's dtype (the Hugging Face spelling)."""
    dim = cos.shape[-1] if rotary_dim is None else rotary_dim
    rot, rest = x[..., :dim], x[..., dim:]
    rotate = rotate_half if layout == "rotate_half" else rotate_interleaved
    return torch.cat((rot * cos + rotate(rot) * sin, rest), dim=-1)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _keep(nq: int, nk: int, causal: bool, align: str, window: int | None, device: torch.device) -> Tensor | None:
    if not causal and not window:
        return None
    q_pos = torch.arange(nq, device=device)[:, None] + (nk - nq if align == "bottom_right" else 0)
    k_pos = torch.arange(nk, device=device)[None, :]
    keep = k_pos <= q_pos if causal else torch.ones(nq, nk, dtype=torch.bool, device=device)
    return keep & (q_pos - k_pos < window) if window else keep


def eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    align: str = "bottom_right",
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    attn_mask: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
    dropout: tuple[Tensor, float] | None = None,
) -> Tensor:
    """tilefuse.ops.attention's semantics spelled as a model would in eager PyTorch: scores in q's dtype, softmax
    upcast (to fp32, fp64 for fp64 inputs) and cast back, K/V repeated for GQA. `dropout` = (keep mask, p)."""
    if rope is not None:
        q, k = eager_rope(q, *rope), eager_rope(k, *rope)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    nq, nk = scores.shape[-2:]
    if alibi_slopes is not None:
        offset = nk - nq if align == "bottom_right" else 0
        rel = torch.arange(nk, device=q.device) - (torch.arange(nq, device=q.device)[:, None] + offset)
        scores = scores + alibi_slopes.reshape(*alibi_slopes.shape, 1, 1) * rel
    keep = _keep(nq, nk, causal, align, window, q.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask if keep is None else keep & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores.to(_softmax_dtype(q.dtype)), dim=-1).to(q.dtype)
    if dropout is not None:
        kept, p = dropout
        probs = probs * kept.to(probs.dtype) / (1.0 - p)
    return torch.matmul(probs, v)


def eager_norm(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float, rms: bool
               ) -> tuple[Tensor, ...]:  # fmt: skip
    """(norm(x + residual), x + residual) or (norm(x),) the Hugging Face way: statistics in fp32, output cast to
    x's dtype, then scaled by the weight (LayerNorm through F.layer_norm)."""
    total = x + residual if residual is not None else x
    if rms:
        xf = total.to(_softmax_dtype(x.dtype))
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    else:
        normed = torch.nn.functional.layer_norm(total, total.shape[-1:], weight, bias, eps)
    return (normed, total) if residual is not None else (normed,)
