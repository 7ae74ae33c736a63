"""Tuning cost: `tilefuse tune` wall time vs torch.compile(mode="max-autotune") compile time on the same model,
and the forward speed each reaches. Recorded as unavailable when this build has no `tilefuse tune`."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import tilefuse

from .harness import TOLERANCE, Case, Context, Record, Runner, run_case

NAME = "tuning"
METRIC = "wall_s"
X_AXIS = "seq"
log = logging.getLogger("tilefuse.benchmarks")
PRESET = "hf:llama"
TUNE_TIMEOUT_S = 420  # the device runs one command for at most 10 minutes


def tune_available() -> bool:
    from tilefuse.compiler.cli import build_parser

    subcommands = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return any("tune" in a.choices for a in subcommands)


def _setup(ctx: Context) -> tuple[int, int, torch.dtype]:
    return (2, 64, torch.float32) if ctx.tiny else (4, 2048, torch.bfloat16)


@contextmanager
def _tuning_db(path: Path) -> Iterator[None]:
    old = os.environ.get("TILEFUSE_TUNING_DB")
    os.environ["TILEFUSE_TUNING_DB"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TILEFUSE_TUNING_DB", None)
        else:
            os.environ["TILEFUSE_TUNING_DB"] = old


FORWARD_FAMILIES = ("attention", "attention_decode", "norm", "rope")


def tune_record(db: Path, ctx: Context) -> Record:
    batch, seq, dtype = _setup(ctx)
    cmd = [sys.executable, "-m", "tilefuse.compiler.cli", "tune", PRESET, "--batch", str(batch), "--seq", str(seq),
           "--dtype", str(dtype).removeprefix("torch."), "--db", str(db), "--force", "--json"]  # fmt: skip
    # The contenders are timed forward only: tune the forward kernels, as max-autotune does for that graph.
    cmd += [arg for family in FORWARD_FAMILIES for arg in ("--family", family)]
    params = {"model": PRESET, "batch": batch, "seq": seq, "dtype": str(dtype), "command": " ".join(cmd[2:])}
    record = Record(NAME, f"tune {PRESET} {batch}x{seq}", params, "tilefuse tune", "ok", timing="wall time")
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TUNE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        record.status, record.reason = "error", f"timed out after {TUNE_TIMEOUT_S} s"
        return record
    record.metrics["wall_s"] = time.perf_counter() - start
    if done.returncode != 0:
        record.status, record.reason = "error", f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    return record


def speed_case(ctx: Context, compile_s: dict[str, float]) -> Case:
    """Forward latency after tuning; each builder times its own first call (the compile) into `compile_s`."""
    from tilefuse.compiler.presets import load_model

    batch, seq, dtype = _setup(ctx)
    model, inputs = load_model(PRESET, batch=batch, seq=seq)
    model = model.to(ctx.device, dtype)
    inputs = tuple(t.to(ctx.device) for t in inputs)
    ct = torch.float64 if ctx.device.type == "cpu" else torch.float32
    ref_model = copy.deepcopy(model).to(ct)
    compilers: dict[str, Callable[[nn.Module], Any]] = {
        "tilefuse (tuned)": lambda m: tilefuse.compile(m, inner=ctx.inner, autotune="db"),
        "max-autotune": lambda m: torch.compile(m, mode="max-autotune"),
        "inductor": lambda m: torch.compile(m),
    }

    def build(name: str) -> Runner:
        fn = compilers[name](model)
        start = time.perf_counter()
        with torch.no_grad():
            fn(*inputs)
        compile_s[name] = time.perf_counter() - start

        def forward() -> Tensor:
            with torch.no_grad():
                out: Tensor = fn(*inputs)
            return out

        return forward

    def reference() -> Tensor:
        with torch.no_grad():
            out: Tensor = ref_model(*inputs)
        return out

    return Case(
        name=f"forward {PRESET} {batch}x{seq}",
        params={"model": PRESET, "batch": batch, "seq": seq, "dtype": str(dtype), "mode": "fwd"},
        reference=reference,
        contenders={name: partial(build, name) for name in compilers},
        tolerance=TOLERANCE[dtype] * 10,  # a whole model, not one op
        work={"tokens": float(batch * seq)},
    )


def run(ctx: Context) -> list[Record]:
    if not tune_available():
        return [Record(NAME, "tune", {}, "tilefuse tune", "unavailable", "`tilefuse tune` is not in this build")]
    records: list[Record] = []
    with tempfile.TemporaryDirectory() as tmp, _tuning_db(Path(tmp) / "tuning.sqlite"):
        db = Path(tmp) / "tuning.sqlite"
        if ctx.wants("tilefuse tune"):
            records.append(tune_record(db, ctx))
        compile_s: dict[str, float] = {}
        case = speed_case(ctx, compile_s)
        if ctx.selected(case.name):
            speed = run_case(NAME, case, ctx)
            for record in speed:
                if record.contender in compile_s:
                    record.metrics["compile_s"] = compile_s[record.contender]
            records += speed
    return records
