"""Measuring one tile config of one kernel family on the GPU: seeded inputs shaped like the Spec, the output checked
against the fp32 reference, then the median (and 20th/80th percentiles) of `triton.testing.do_bench`. The cases
(inputs, launch with the config's knobs, reference) live in `costmodel.cases`, shared with the interpreter timing of
the collection tests. Needs CUDA; on a CPU-only machine `require_cuda` raises a clear error (use mode "model").
"""

from __future__ import annotations

from collections.abc import Callable

from tilefuse.codegen.plan import TileConfig
from tilefuse.costmodel.cases import TOLERANCE, measure_case
from tilefuse.specs import Spec

from .records import Measurement

__all__ = ["REPEAT_MS", "TOLERANCE", "WARMUP_MS", "gpu_measure", "require_cuda"]

WARMUP_MS = 25
REPEAT_MS = 100


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
    """Run kernel family `kind` (default: the Spec's forward family, `autotune.space.kernel_family`) with `config`
    on the current GPU: verify, then time. Failures are statuses (compile-fail, oom, wrong-output)."""
    from .space import kernel_family

    require_cuda()
    try:
        family = kind or kernel_family(spec)
    except (TypeError, ValueError) as err:
        return Measurement("error", error=str(err)[:500])
    return measure_case(spec, config, family, "cuda", _do_bench)
