"""A deterministic synthetic latency function for search tests (no GPU): a bowl over the tile knobs with its
minimum at 128x64, 8 warps, 3 stages; configs with block_n == 16 and 2 warps "fail to compile".

Worker-process tests import it as `_synthetic:synthetic_latency`. With SYNTHETIC_KILL_WORKER=i and
SYNTHETIC_KILL_AT=n, worker i kills itself (SIGKILL) in the middle of its n-th measurement; SYNTHETIC_LOG names a
file that gets one line per finished measurement (pid, config).
"""

from __future__ import annotations

import math
import os
import signal
import time

from tilefuse.codegen.plan import TileConfig
from tilefuse.costmodel.measure import Measurement

OPTIMUM = TileConfig(128, 64, 8, 3)
_calls = 0


def synthetic_cost(config: TileConfig) -> float:
    return (10.0 + 3 * abs(math.log2(config.block_m / 128)) + 2 * abs(math.log2(config.block_n / 64))
            + abs(math.log2(config.num_warps / 8)) + 0.5 * abs(config.num_stages - 3))  # fmt: skip


def synthetic_latency(spec: object, config: TileConfig) -> Measurement:
    global _calls
    _calls += 1
    if os.environ.get("SYNTHETIC_KILL_WORKER") == os.environ.get("TILEFUSE_WORKER_INDEX", "-") and _calls == int(
        os.environ.get("SYNTHETIC_KILL_AT", "0")
    ):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("SYNTHETIC_SLEEP_S", "0")))
    log = os.environ.get("SYNTHETIC_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {config.block_m} {config.block_n} {config.num_warps} {config.num_stages}\n")
    if config.block_n == 16 and config.num_warps == 2:
        return Measurement("compile-fail", error="synthetic: out of registers")
    value = synthetic_cost(config)
    return Measurement.ok(value, value * 0.98, value * 1.02)
