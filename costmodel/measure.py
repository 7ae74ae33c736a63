"""Measurements (one config's status and latency quantiles) and measuring one tile config of one kernel family on
the GPU: seeded inputs shaped like the Spec, the output checked against the fp32 reference, then the median (and
20th/80th percentiles) of `triton.testing.do_bench`. The cases (inputs, launch with the config's knobs, reference)
live in `costmodel.cases`, shared with the interpreter timing of the collection tests. Needs CUDA; on a CPU-only
machine `require_cuda` raises a clear error (use mode "model").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tilefuse.codegen.families import kernel_family
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import Spec

WARMUP_MS = 25
REPEAT_MS = 100
# ok: measured; predicted: cost model only; the rest are failures, recorded and never chosen.
TRIAL_STATUSES = ("ok", "predicted", "compile-fail", "oom", "timeout", "wrong-output", "infeasible", "error")


@dataclass(frozen=True)
class Measurement:
    """One config measured (or predicted). `latency_us` holds quantiles {"p20", "p50", "p80"} for measured runs."""

    status: str
    latency_us: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in TRIAL_STATUSES:
            raise ValueError(f"status={self.status!r}; expected one of {list(TRIAL_STATUSES)}")

    @property
    def median_us(self) -> float:
        return float(self.latency_us.get("p50", math.inf)) if self.status == "ok" else math.inf

    @classmethod
    def ok(cls, p50_us: float, p20_us: float | None = None, p80_us: float | None = None) -> Measurement:
        low, high = p20_us if p20_us is not None else p50_us, p80_us if p80_us is not None else p50_us
        return cls("ok", {"p20": float(low), "p50": float(p50_us), "p80": float(high)})


def require_cuda() -> None:
    """Raise RuntimeError unless a CUDA device is present (mode "measure" and "exhaustive" run kernels)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "autotune mode 'measure'/'exhaustive' runs kernels and needs a CUDA GPU; this machine has none. "
            "Use mode 'model' (the cost model's choice), or inject a measure function."
        )


def _do_bench(run: Callable[[], object]) -> tuple[float, float, float]:
    """(p50, p20, p80) in µs of `run` on the current GPU (do_bench reports ms)."""
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(run, warmup=WARMUP_MS, rep=REPEAT_MS, quantiles=[0.5, 0.2, 0.8])
    return p50 * 1e3, p20 * 1e3, p80 * 1e3


def gpu_measure(spec: Spec, config: TileConfig, kind: str | None = None) -> Measurement:
    """Run kernel family `kind` (default: the Spec's forward family, `codegen.families.kernel_family`) with `config`
    on the current GPU: verify, then time. Failures are statuses (compile-fail, oom, wrong-output)."""
    from .cases import measure_case

    require_cuda()
    try:
        family = kind or kernel_family(spec)
    except (TypeError, ValueError) as err:
        return Measurement("error", error=str(err)[:500])
    return measure_case(spec, config, family, "cuda", _do_bench)
