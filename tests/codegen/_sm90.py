"""Run a Triton compile script for sm_90 in a child process without the interpreter (no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest


def compile_in_child(script: str) -> Any:
    """The JSON the script prints last; skips when the CUDA toolchain bundled with triton is unusable here.

    A child process is needed because TRITON_INTERPRET=1 replaces @triton.jit functions in this one.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and ("ptxas" in done.stderr or "libdevice" in done.stderr):
        pytest.skip(f"the CUDA toolchain shipped with triton is unusable here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
