"""The autotuner's GPU measurement (costmodel.measure.gpu_measure) of a small attention Spec: each config's output is
checked against the reference before it is timed, and every timing is finite. The CPU override measures through
costmodel.collect.interpreter_measure, the same measure_case under the interpreter."""

from __future__ import annotations

import math

from _kernel_watch import KernelWatch
from _profile import ON_CPU, PROFILE

from tilefuse.codegen.plan import TileConfig
from tilefuse.costmodel.measure import Measurement
from tilefuse.specs import AttentionSpec

D_SMALL = PROFILE.head_dims[0]
# The first is the launcher's default for this Spec, whose kernel test_gpu_attention.py's "full" case compiled.
GPU_CONFIGS = [TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 2), TileConfig(128, 32, 4, 3)]
CPU_CONFIGS = [TileConfig(16, 16, 1, 1), TileConfig(32, 16, 2, 1), TileConfig(16, 32, 2, 1)]


def _measure(spec: AttentionSpec, config: TileConfig) -> Measurement:
    if ON_CPU:
        from tilefuse.costmodel.collect import interpreter_measure

        return interpreter_measure(spec, config, "attention", repeats=2)
    from tilefuse.costmodel.measure import gpu_measure

    return gpu_measure(spec, config, "attention")


def test_gpu_measure_checks_and_times_each_config(kernels: KernelWatch) -> None:
    heads, n = PROFILE.kv_heads, PROFILE.seq
    spec = AttentionSpec(batch=PROFILE.batch, q_heads=heads, kv_heads=heads, q_len=n, kv_len=n, head_dim=D_SMALL,
                         v_head_dim=D_SMALL, dtype="bfloat16", scale=D_SMALL**-0.5)  # fmt: skip
    configs = CPU_CONFIGS if ON_CPU else GPU_CONFIGS
    for config in configs:
        measured = _measure(spec, config)
        assert measured.status == "ok", f"{config}: {measured.status} {measured.error}"
        quantiles = [measured.latency_us[q] for q in ("p20", "p50", "p80")]
        assert all(math.isfinite(t) and t > 0 for t in quantiles), (config, measured.latency_us)
        assert quantiles == sorted(quantiles), (config, measured.latency_us)
    kernels.assert_ran("attention_fwd_kernel")
    blocks = {(launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"]) for launch in kernels.launches}
    assert blocks == {(c.block_m, c.block_n) for c in configs}, blocks
