"""RMSNorm / LayerNorm (+ residual add) and RoPE, forward and forward+backward: tilefuse vs Liger-Kernel,
torch.compile default and eager, in GB/s of the tensors each op must read and write once, next to the GB/s of a
device-to-device copy of the same tensor measured in the same run (`copy_fraction`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_impls import rope_rotate_half
from .harness import TOLERANCE, Case, Context, Record, Runner, Unavailable, run_case

NAME = "norms"
METRIC = "gbps"
X_AXIS = "hidden"
EPS = 1e-6
CONTENDERS = ("tilefuse", "liger", "compile", "eager")
log = logging.getLogger("tilefuse.benchmarks")
OpFn = Callable[..., tuple[Tensor, ...]]


# -------------------------------------------------------------------------------------------- eager forms
def eager_rms_norm(x: Tensor, w: Tensor) -> Tensor:
    """Hugging Face LlamaRMSNorm: statistics in fp32 (or wider), scale in the input dtype."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def _eager(op: str, *t: Tensor) -> tuple[Tensor, ...]:
    if op == "rmsnorm":
        return (eager_rms_norm(t[0], t[1]),)
    if op == "layernorm":
        return (F.layer_norm(t[0], t[0].shape[-1:], t[1], t[2], EPS),)
    if op == "rope":
        q, k, cos, sin = t
        return rope_rotate_half(q, cos, sin), rope_rotate_half(k, cos, sin)
    summed = t[0] + t[1]  # "+residual": (norm(x + r), x + r)
    return (*_eager(op.removesuffix("+residual"), summed, *t[2:]), summed)


def _eager_op(op: str) -> OpFn:
    """A plain function for torch.compile (a compiled functools.partial pays extra guard overhead per call)."""

    def eager(*t: Tensor) -> tuple[Tensor, ...]:
        return _eager(op, *t)

    return eager


def _tilefuse(op: str, *t: Tensor) -> tuple[Tensor, ...]:
    from tilefuse import ops

    results: dict[str, Callable[[], Any]] = {
        "rmsnorm": lambda: ops.rms_norm(t[0], t[1], EPS),
        "rmsnorm+residual": lambda: ops.rms_norm(t[0], t[2], EPS, residual=t[1]),
        "layernorm": lambda: ops.layer_norm(t[0], t[1], t[2], EPS),
        "layernorm+residual": lambda: ops.layer_norm(t[0], t[2], t[3], EPS, residual=t[1]),
        "rope": lambda: (ops.apply_rope(t[0], t[2], t[3]), ops.apply_rope(t[1], t[2], t[3])),
    }
    out = results[op]()
    return out if isinstance(out, tuple) else (out,)


def _liger_fn(op: str, device: torch.device) -> OpFn:
    """Liger-Kernel's autograd functions (in_place=False: the benchmark reuses its output gradients)."""
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel's Triton kernels need a CUDA device")
    try:
        if op == "rmsnorm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, w: (LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False),)
        if op == "layernorm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return lambda x, w, b: (LigerLayerNormFunction.apply(x, w, b, EPS),)
        if op == "rope":
            from liger_kernel.transformers.rope import liger_rotary_pos_emb

            return lambda q, k, cos, sin: tuple(liger_rotary_pos_emb(q, k, cos[None], sin[None]))
        if op == "rmsnorm+residual":
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

            return lambda x, r, w: tuple(LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False))
    except ImportError as err:
        raise Unavailable(f"Liger-Kernel is not importable here: {err}") from err
    raise Unavailable(f"Liger-Kernel has no fused {op}")


# -------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class NormProblem:
    op: str
    shape: tuple[int, ...]  # norms: (rows, hidden); rope: (batch, q_heads, kv_heads, seq, head_dim)
    dtype: str = "bfloat16"

    @property
    def copy_shape(self) -> tuple[int, ...]:
        """The tensor whose copy bandwidth is this op's yardstick: x, or q for RoPE."""
        if self.op == "rope":
            b, hq, _, n, d = self.shape
            return (b, hq, n, d)
        return self.shape

    def tensors(self, device: torch.device) -> tuple[list[Tensor], int]:
        """Inputs, and how many leading ones are differentiable."""
        gen = torch.Generator().manual_seed(0)
        dtype = getattr(torch, self.dtype)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen).to(device, dtype)

        if self.op == "rope":
            b, hq, hk, n, d = self.shape
            angles = torch.outer(torch.arange(n, dtype=torch.float64), 1e-4 ** (torch.arange(0, d, 2) / d))
            angles = torch.cat((angles, angles), dim=-1)
            return [
                randn(b, hq, n, d),
                randn(b, hk, n, d),
                *(t.to(device, dtype) for t in (angles.cos(), angles.sin())),
            ], 2
        rows, hidden = self.shape
        inputs = [randn(rows, hidden)] + ([randn(rows, hidden)] if self.op.endswith("+residual") else [])
        inputs.append(1.0 + 0.1 * randn(hidden))
        if self.op.startswith("layernorm"):
            inputs.append(0.1 * randn(hidden))
        return inputs, len(inputs)


def _runner(fn: OpFn, inputs: list[Tensor], n_diff: int, grads: list[Tensor] | None) -> Runner:
    if grads is None:
        return partial(fn, *inputs)
    diff = [t.requires_grad_(True) for t in inputs[:n_diff]]

    def forward_backward() -> tuple[Tensor, ...]:
        outs = fn(*inputs)
        return (*outs, *torch.autograd.grad(outs, diff, grads))

    return forward_backward


def _bytes(tensors: list[Tensor]) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors))


def make_case(p: NormProblem, backward: bool, ctx: Context) -> Case:
    inputs, n_diff = p.tensors(ctx.device)
    outs = _eager(p.op, *inputs)
    grads = [torch.randn_like(o) for o in outs] if backward else None
    work = _bytes(inputs) + _bytes(list(outs))  # each input read once, each output written once
    if grads is not None:  # backward: read the output grads and x, write a grad per differentiable input
        work += _bytes(grads) + _bytes(inputs[:1]) + _bytes(inputs[:n_diff])
    ct = torch.float64 if ctx.device.type == "cpu" else torch.float32
    ref_inputs = [t.to(ct) for t in inputs]
    ref_grads = [g.to(ct) for g in grads] if grads is not None else None
    fns: dict[str, Callable[[], OpFn]] = {
        "tilefuse": lambda: partial(_tilefuse, p.op),
        "liger": lambda: _liger_fn(p.op, ctx.device),
        "compile": lambda: torch.compile(_eager_op(p.op), dynamic=False),
        "eager": lambda: partial(_eager, p.op),
    }
    return Case(
        name=case_name(p, backward),
        params={"op": p.op, "shape": list(p.shape), "dtype": p.dtype, "mode": "fwd+bwd" if backward else "fwd",
                "hidden": p.shape[-1], "copy_of": "x".join(map(str, p.copy_shape)),
                "series": f"{'fwd+bwd' if backward else 'fwd'} {p.op}"},
        reference=_runner(partial(_eager, p.op), ref_inputs, n_diff, ref_grads),
        contenders={n: _builder(fn, inputs, n_diff, grads) for n, fn in fns.items()},
        tolerance=TOLERANCE[getattr(torch, p.dtype)] * (2 if backward else 1),
        work={"bytes": work},
    )  # fmt: skip


def _builder(
    fn: Callable[[], OpFn], inputs: list[Tensor], n_diff: int, grads: list[Tensor] | None
) -> Callable[[], Runner]:
    return lambda: _runner(fn(), inputs, n_diff, grads)


def case_name(p: NormProblem, backward: bool) -> str:
    shape = "x".join(map(str, p.shape))
    return f"{'fwd+bwd' if backward else 'fwd'} {p.op} {shape}"


def copy_case(shape: tuple[int, ...], dtype: str, ctx: Context) -> Case:
    """The bandwidth yardstick: dst.copy_(src), reading and writing the norm's input tensor once."""
    src = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(ctx.device, getattr(torch, dtype))
    dst = torch.empty_like(src)
    return Case(
        name=f"copy {'x'.join(map(str, shape))}",
        params={
            "op": "copy",
            "shape": list(shape),
            "dtype": dtype,
            "mode": "copy",
            "hidden": shape[-1],
            "copy_of": "x".join(map(str, shape)),
        },
        reference=lambda: src,
        contenders={"copy": lambda: partial(dst.copy_, src)},
        tolerance=0.0,
        work={"bytes": 2.0 * src.numel() * src.element_size()},
    )


def problems(ctx: Context) -> list[NormProblem]:
    rows, hiddens = (64, (256,)) if ctx.tiny else (16384, (2048, 4096, 8192))
    rope_shape = (1, 4, 2, 32, 64) if ctx.tiny else (4, 32, 8, 4096, 128)
    ops = ("rmsnorm", "rmsnorm+residual", "layernorm", "layernorm+residual")
    # Llama-3.1-405B's hidden size: rows wider than norm_kernels.MAX_ROW_BLOCK run the chunked kernels
    wide = [] if ctx.tiny else [NormProblem(op, (rows // 4, 16384)) for op in ops]
    return [NormProblem(op, (rows, h)) for h in hiddens for op in ops] + wide + [NormProblem("rope", rope_shape)]


def finish(records: list[Record]) -> None:
    """GB/s as a fraction of the device-to-device copy of the same shape (run.py calls it again on resume)."""
    copy_gbps = {r.params["copy_of"]: r.metrics.get("gbps") for r in records if r.params["op"] == "copy"}
    for record in records:
        gbps, copy = record.metrics.get("gbps"), copy_gbps.get(record.params["copy_of"])
        if gbps and copy and record.params["op"] != "copy":
            record.metrics["copy_fraction"] = gbps / copy


def run(ctx: Context) -> list[Record]:
    records: list[Record] = []
    copied: set[tuple[int, ...]] = set()
    for p in problems(ctx):
        for backward in (False, True):
            name = case_name(p, backward)
            if not ctx.selected(name):
                continue
            if p.copy_shape not in copied:  # the yardstick runs whatever contenders were asked for
                copied.add(p.copy_shape)
                records += run_case(NAME, copy_case(p.copy_shape, p.dtype, ctx), replace(ctx, contenders=None))
            log.info("norms: %s", name)
            records += run_case(NAME, make_case(p, backward, ctx), ctx)
    finish(records)
    return records
