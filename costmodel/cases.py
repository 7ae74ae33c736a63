"""One kernel family's launch as a measurable case: seeded random inputs shaped like the Spec, a launch of the
family's launcher with a config's knobs, and the fp32 reference outputs to check it against.

Shared by the GPU measurement (`costmodel.measure.gpu_measure`, device "cuda") and the interpreter timing of the
collection tests (`costmodel.collect.interpreter_measure`, device "cpu"): both go through `measure_case`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tilefuse.codegen.tile_config import TileConfig
from tilefuse.costmodel.measure import Measurement
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec, rope_layout_code

# Output check against the fp32 reference: |out - ref| <= ATOL·max(1, max|ref|) + RTOL·|ref|, per dtype.
TOLERANCE = {"float32": (2e-3, 2e-3), "float16": (1e-2, 1e-2), "bfloat16": (3e-2, 3e-2)}
BACKWARD_TOLERANCE_FACTOR = 4  # gradients round P and dS to the input dtype before their dots (as FA2 does)
# Score-matrix elements one reference call may hold (fp32, several live at once): full-size shapes are checked a
# batch row and a few heads at a time, so the golden output fits beside the kernel's inputs on one GPU.
REFERENCE_CHUNK_ELEMENTS = 2**27
# (p50, p20, p80) in µs of repeated calls of a launch.
Timer = Callable[[Callable[[], object]], tuple[float, float, float]]


@dataclass(frozen=True)
class KernelCase:
    """`launch(config)` runs the family's launcher with the config's knobs and returns the outputs that `expected`
    (fp32, same order, named by `names`) holds the reference of."""

    launch: Callable[[TileConfig], tuple[Any, ...]]
    expected: tuple[Any, ...]
    names: tuple[str, ...]
    tolerance: tuple[float, float]

    def mismatch(self, outputs: tuple[Any, ...]) -> str | None:
        """Why `outputs` disagree with the reference, or None when every output is within tolerance."""
        atol, rtol = self.tolerance
        for name, out, ref in zip(self.names, outputs, self.expected, strict=True):
            out = out.float()
            if not bool(out.isfinite().all()):
                return f"{name}: non-finite output"
            scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            excess = float(((out - ref).abs() - rtol * ref.abs()).max()) / scale if ref.numel() else 0.0
            if excess > atol:
                return f"{name}: max error {excess:.3g} (relative to max |ref| {scale:.3g}) > atol {atol}"
        return None


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name.removeprefix("torch."))


def _tolerance(dtype: str, backward: bool) -> tuple[float, float]:
    atol, rtol = TOLERANCE.get(dtype.removeprefix("torch."), (1e-2, 1e-2))
    factor = BACKWARD_TOLERANCE_FACTOR if backward else 1
    return atol * factor, rtol * factor


class _Random:
    """Seeded random tensors on one device, drawn in fp32 and cast (the same values on every device)."""

    def __init__(self, device: str, dtype: str) -> None:
        import torch

        self.device, self.dtype = device, _dtype(dtype)
        self.gen = torch.Generator(device=device).manual_seed(0)

    def normal(self, *shape: int, scale: float = 1.0, shift: float = 0.0) -> Any:
        import torch

        values = torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return (values * scale + shift).to(self.dtype)

    def uniform(self, *shape: int) -> Any:
        import torch

        return torch.rand(*shape, generator=self.gen, device=self.device, dtype=torch.float32)


def _fp32(t: Any) -> Any:
    return t.float() if t is not None and t.is_floating_point() else t


# ------------------------------------------------------------------------------------------------- attention
def _attention_inputs(spec: AttentionSpec, rand: _Random) -> tuple[Any, Any]:
    import torch

    from tilefuse.codegen import reference as ref

    b, hq, hk, nq, nk = (int(d or 1) for d in (spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len))
    device = rand.device
    mask = None
    if spec.mask == "additive":
        mask = torch.zeros(b, 1, nq, nk, device=device, dtype=rand.dtype)
    elif spec.mask in ("boolean", "key_padding"):
        mask = torch.ones(b, 1, 1 if spec.mask == "key_padding" else nq, nk, device=device, dtype=torch.bool)
    slopes = torch.linspace(0.1, 1.0, hq, device=device).expand(b, hq).contiguous() if spec.alibi else None
    cos = sin = rng = None
    if spec.rope is not None:  # one table for q and k rows: a single position when their lengths differ (decode)
        angles = rand.uniform(nq if nq == nk else 1, spec.rope.rotary_dim)
        cos, sin = angles.cos().to(rand.dtype), angles.sin().to(rand.dtype)
    if spec.dropout_p:
        rng = torch.tensor([1234, 0], dtype=torch.int64, device=device)
    q, k = rand.normal(b, hq, nq, spec.head_dim), rand.normal(b, hk, nk, spec.head_dim)
    inputs = ref.AttnInputs(q, k, rand.normal(b, hk, nk, spec.v_head_dim), mask, slopes, cos, sin, rng)
    return inputs, ref.AttnFlags.from_spec(spec)


def _reference_chunks(inputs: Any, flags: Any) -> list[tuple[int, slice]]:
    """(batch row, kv-head range) pieces small enough for the reference; one piece (the whole call) when the call
    is small or draws dropout (its random stream depends on the batch and head index)."""
    batch, q_heads, q_len = inputs.q.shape[:3]
    kv_heads, kv_len = inputs.k.shape[1], inputs.k.shape[2]
    group = q_heads // kv_heads
    per_kv_head = group * q_len * kv_len
    if flags.dropout_p or batch * kv_heads * per_kv_head <= REFERENCE_CHUNK_ELEMENTS:
        return []
    step = max(1, REFERENCE_CHUNK_ELEMENTS // per_kv_head)
    return [(b, slice(h, min(h + step, kv_heads))) for b in range(batch) for h in range(0, kv_heads, step)]


def _piece(inputs: Any, b: int, kv: slice) -> Any:
    group = inputs.q.shape[1] // inputs.k.shape[1]
    heads = slice(kv.start * group, kv.stop * group)
    mask = inputs.mask if inputs.mask is None or inputs.mask.shape[0] == 1 else inputs.mask[b : b + 1]
    slopes = None if inputs.alibi_slopes is None else inputs.alibi_slopes[b : b + 1, heads]
    return inputs._replace(q=inputs.q[b : b + 1, heads], k=inputs.k[b : b + 1, kv], v=inputs.v[b : b + 1, kv],
                           mask=mask, alibi_slopes=slopes)  # fmt: skip


def _reference_forward(inputs: Any, flags: Any) -> Any:
    """reference.attention_forward in pieces (`_reference_chunks`) written into one output."""
    from tilefuse.codegen import reference as ref

    chunks = _reference_chunks(inputs, flags)
    if not chunks:
        return ref.attention_forward(inputs, flags)
    q, v = inputs.q, inputs.v
    out = q.new_empty(*q.shape[:3], v.shape[3])
    group = q.shape[1] // v.shape[1]
    for b, kv in chunks:
        out[b : b + 1, kv.start * group : kv.stop * group] = ref.attention_forward(_piece(inputs, b, kv), flags)
    return out


def _reference_backward(grad: Any, inputs: Any, flags: Any) -> tuple[Any, Any, Any]:
    """reference.attention_backward in pieces (`_reference_chunks`) written into (dq, dk, dv)."""
    from tilefuse.codegen import reference as ref

    chunks = _reference_chunks(inputs, flags)
    if not chunks:
        return ref.attention_backward(grad, inputs, flags)
    grads = tuple(t.new_empty(t.shape) for t in (inputs.q, inputs.k, inputs.v))
    group = inputs.q.shape[1] // inputs.k.shape[1]
    for b, kv in chunks:
        heads = slice(kv.start * group, kv.stop * group)
        dq, dk, dv = ref.attention_backward(grad[b : b + 1, heads], _piece(inputs, b, kv), flags)
        grads[0][b : b + 1, heads], grads[1][b : b + 1, kv], grads[2][b : b + 1, kv] = dq, dk, dv
    return grads[0], grads[1], grads[2]


def _attention_case(spec: AttentionSpec, kind: str, device: str) -> KernelCase:
    from tilefuse.codegen import reference as ref
    from tilefuse.codegen.attention_bwd import attention_backward_triton
    from tilefuse.codegen.attention_decode import attention_decode_triton
    from tilefuse.codegen.attention_fwd import attention_forward_triton

    rand = _Random(device, spec.dtype)
    inputs, flags = _attention_inputs(spec, rand)
    golden = ref.AttnInputs(*(_fp32(t) for t in inputs))
    tolerance = _tolerance(spec.dtype, kind == "attention_backward")
    if kind == "attention_backward":
        out, lse = attention_forward_triton(inputs, flags)  # once: the backward reads the forward's out and lse
        grad = rand.normal(*out.shape)
        gradients = _reference_backward(grad.float(), golden, flags)

        def backward(config: TileConfig) -> tuple[Any, ...]:
            return attention_backward_triton(grad, inputs, flags, out, lse, None, **config.attention_knobs())

        return KernelCase(backward, gradients, ("dq", "dk", "dv"), tolerance)
    expected = (_reference_forward(golden, flags),)
    if kind == "attention_decode":

        def decode(config: TileConfig) -> tuple[Any, ...]:
            return attention_decode_triton(inputs, flags, **config.decode_knobs())[:1]

        return KernelCase(decode, expected, ("out",), tolerance)

    def forward(config: TileConfig) -> tuple[Any, ...]:
        return attention_forward_triton(inputs, flags, **config.attention_knobs())[:1]

    return KernelCase(forward, expected, ("out",), tolerance)


# ----------------------------------------------------------------------------------------------- norm, rope
def _norm_case(spec: NormSpec, kind: str, device: str) -> KernelCase:
    from tilefuse.codegen import reference as ref
    from tilefuse.codegen.norm_kernels import norm_backward_triton, norm_forward_triton

    rand = _Random(device, spec.dtype)
    shape, rms, width = tuple(int(d or 1) for d in spec.shape), spec.norm == "rmsnorm", spec.width
    x = rand.normal(*shape)
    weight = rand.normal(width, scale=0.1, shift=1.0) if spec.has_weight else None
    bias = rand.normal(width, scale=0.1) if spec.has_bias else None
    params = (_fp32(weight), _fp32(bias))
    if kind == "norm_backward":
        grad = rand.normal(*shape)
        _, mean, rstd = ref.norm_forward(x.float(), *params, spec.eps, spec.weight_offset, rms)
        golden = ref.norm_backward(grad.float(), x.float(), params[0], mean, rstd, spec.weight_offset, rms)
        expected = tuple(t for t in golden if t is not None)

        def backward(config: TileConfig) -> tuple[Any, ...]:
            dx, dweight, dbias = norm_backward_triton(
                grad, x, weight, None if rms else mean, rstd, spec.weight_offset, rms, **config.norm_backward_knobs()
            )
            return tuple(t for t in (dx, dweight, dbias) if t is not None)

        names = tuple(n for n, t in zip(("dx", "dweight", "dbias"), golden, strict=True) if t is not None)
        return KernelCase(backward, expected, names, _tolerance(spec.dtype, True))
    residual = rand.normal(*shape) if spec.residual else None
    total = x.float() + residual.float() if residual is not None else x.float()
    y = ref.norm_forward(total, *params, spec.eps, spec.weight_offset, rms)[0]

    def forward(config: TileConfig) -> tuple[Any, ...]:
        out, out_total, _, _ = norm_forward_triton(x, weight, bias, residual, spec.eps, spec.weight_offset, rms,
                                                   **config.norm_knobs())  # fmt: skip
        return (out,) if out_total is None else (out, out_total)

    if residual is None:
        return KernelCase(forward, (y,), ("y",), _tolerance(spec.dtype, False))
    return KernelCase(forward, (y, total), ("y", "sum"), _tolerance(spec.dtype, False))


def _rope_case(spec: RopeSpec, device: str) -> KernelCase:
    from tilefuse.codegen import reference as ref
    from tilefuse.codegen.rope_kernels import rope_forward_triton

    rand = _Random(device, spec.dtype)
    shape = tuple(int(d or 1) for d in spec.shape) or (1, spec.head_dim)
    x = rand.normal(*shape)
    angles = rand.uniform(*shape[-2:-1], spec.rotary_dim)  # one row per position, broadcast over batch and heads
    cos, sin = angles.cos().to(rand.dtype), angles.sin().to(rand.dtype)
    layout = rope_layout_code(spec.layout)
    expected = (ref.rope_forward(x.float(), cos.float(), sin.float(), layout, spec.rotary_dim),)

    def forward(config: TileConfig) -> tuple[Any, ...]:
        return (rope_forward_triton(x, cos, sin, layout, spec.rotary_dim, **config.rope_knobs()),)

    return KernelCase(forward, expected, ("y",), _tolerance(spec.dtype, False))


@functools.lru_cache(maxsize=4)
def kernel_case(spec: Spec, kind: str, device: str) -> KernelCase:
    """The case of kernel family `kind` (autotune.space.KERNEL_FAMILIES) for `spec` on `device`, seeded; cached, so
    the inputs and the reference are built once for all the configs of a Spec."""
    if isinstance(spec, AttentionSpec) and kind in ("attention", "attention_decode", "attention_backward"):
        return _attention_case(spec, kind, device)
    if isinstance(spec, NormSpec) and kind in ("norm", "norm_backward"):
        return _norm_case(spec, kind, device)
    if isinstance(spec, RopeSpec) and kind == "rope":
        return _rope_case(spec, device)
    raise ValueError(f"kernel family {kind!r} does not launch a {type(spec).__name__}")


def measure_case(spec: Spec, config: TileConfig, kind: str, device: str, timer: Timer) -> Measurement:
    """Launch `config` once, check the outputs against the reference, then time it with `timer`. Failures are
    statuses: "oom", "compile-fail" (compile errors, out of resources, knobs a launcher refuses), "wrong-output"."""
    import torch

    try:
        case = kernel_case(spec, kind, device)
    except torch.OutOfMemoryError as err:
        return Measurement("oom", error=f"inputs: {err}"[:500])
    except (TypeError, ValueError) as err:
        return Measurement("error", error=str(err)[:500])

    def run() -> tuple[Any, ...]:
        return case.launch(config)

    try:
        outputs = run()
    except torch.OutOfMemoryError as err:
        return Measurement("oom", error=str(err)[:500])
    except Exception as err:  # Triton compile errors, out-of-resource at launch
        return Measurement("compile-fail", error=f"{type(err).__name__}: {err}"[:500])
    wrong = case.mismatch(outputs)
    if wrong is not None:
        return Measurement("wrong-output", error=wrong[:500])
    try:
        p50, p20, p80 = timer(run)
    except torch.OutOfMemoryError as err:
        return Measurement("oom", error=str(err)[:500])
    if not all(math.isfinite(t) and t > 0 for t in (p50, p20, p80)):
        return Measurement("error", error=f"timer returned {(p50, p20, p80)}")
    return Measurement.ok(p50, p20, p80)
