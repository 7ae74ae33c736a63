"""Measuring one tile config on the GPU: random inputs shaped like the Spec, the output checked against the
reference, then the median (and 20th/80th percentiles) of `triton.testing.do_bench`. Needs CUDA; on a CPU-only
machine `require_cuda` raises a clear error (use mode "model" there).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from tilefuse.codegen.plan import TileConfig
from tilefuse.specs import AttentionSpec, Spec

from .records import Measurement

WARMUP_MS = 25
REPEAT_MS = 100
# Output check against the fp32 reference: |out - ref| <= ATOL + RTOL·|ref|, per dtype.
TOLERANCE = {"float32": (2e-3, 2e-3), "float16": (1e-2, 1e-2), "bfloat16": (3e-2, 3e-2)}


def require_cuda() -> None:
    """Raise RuntimeError unless a CUDA device is present (mode "measure" and "exhaustive" run kernels)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "autotune mode 'measure'/'exhaustive' runs kernels and needs a CUDA GPU; this machine has none. "
            "Use mode 'model' (the cost model's choice), or inject a measure function."
        )


@functools.lru_cache(maxsize=4)
def _attention_case(spec: AttentionSpec) -> tuple[Any, Any, Any]:
    """(inputs, flags, reference output) for `spec` on the current CUDA device, seeded."""
    import torch

    from tilefuse.codegen import reference as ref

    dtype = getattr(torch, spec.dtype.removeprefix("torch."))
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hk, nq, nk = (int(d or 1) for d in (spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    mask = None
    if spec.mask == "additive":
        mask = torch.zeros(b, 1, nq, nk, device="cuda", dtype=dtype)
    elif spec.mask in ("boolean", "key_padding"):
        mask = torch.ones(b, 1, 1 if spec.mask == "key_padding" else nq, nk, device="cuda", dtype=torch.bool)
    slopes = torch.linspace(0.1, 1.0, hq, device="cuda").expand(b, hq).contiguous() if spec.alibi else None
    cos = sin = None
    if spec.rope is not None:
        angles = torch.rand(max(nq, nk), spec.rope.rotary_dim, generator=gen, device="cuda")
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    inputs = ref.AttnInputs(randn(b, hq, nq, spec.head_dim), randn(b, hk, nk, spec.head_dim),
                            randn(b, hk, nk, spec.v_head_dim), mask, slopes, cos, sin)  # fmt: skip
    flags = ref.AttnFlags(
        spec.scale, spec.causal, spec.align == "bottom_right", spec.window or 0, spec.softcap or 0.0,
        (0 if spec.rope.layout == "rotate_half" else 1) if spec.rope else -1,
        spec.rope.rotary_dim if spec.rope else 0,
    )  # fmt: skip
    return inputs, flags, ref.attention_forward(inputs, flags).float()


def gpu_measure(spec: Spec, config: TileConfig) -> Measurement:
    """Run `spec`'s forward kernel with `config` on the current GPU: verify, then time. Failures are statuses."""
    import torch
    import triton.testing

    require_cuda()
    if not isinstance(spec, AttentionSpec):
        return Measurement("error", error=f"{spec.kind}: only the attention kernel takes a tile config")
    from tilefuse.codegen.attention_fwd import attention_forward_triton

    inputs, flags, expected = _attention_case(spec)
    knobs = {"block_m": config.block_m, "block_n": config.block_n, "num_warps": config.num_warps,
             "num_stages": config.num_stages}  # fmt: skip

    def run() -> Any:
        return attention_forward_triton(inputs, flags, **knobs)

    try:
        out = run()[0].float()
    except torch.cuda.OutOfMemoryError as err:
        return Measurement("oom", error=str(err)[:500])
    except Exception as err:  # Triton compile errors, out-of-resource at launch
        return Measurement("compile-fail", error=f"{type(err).__name__}: {err}"[:500])
    atol, rtol = TOLERANCE.get(spec.dtype.removeprefix("torch."), (1e-2, 1e-2))
    error = (out - expected).abs() - rtol * expected.abs()
    if not math.isfinite(float(out.abs().max())) or float(error.max()) > atol:
        return Measurement("wrong-output", error=f"max error {float(error.max()):.3g} > atol {atol}")
    p50, p20, p80 = triton.testing.do_bench(run, warmup=WARMUP_MS, rep=REPEAT_MS, quantiles=[0.5, 0.2, 0.8])
    return Measurement.ok(p50 * 1e3, p20 * 1e3, p80 * 1e3)  # do_bench reports ms
