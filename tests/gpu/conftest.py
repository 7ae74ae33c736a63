"""Tests that run the compiled Triton kernels on a real GPU; every test here is marked `gpu`.

On a GPU machine:

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu -x

TRITON_INTERPRET=0 must be given explicitly: tests/conftest.py sets TRITON_INTERPRET=1 by `setdefault` for the
CPU suite, and interpreted kernels would prove nothing about the compiled ones. Without CUDA, or with the
interpreter on, every test here is skipped with the reason (that is what CPU CI does).

Developer override, to check the test logic on a CPU-only machine:

    TILEFUSE_GPU_TESTS_DEVICE=cpu .venv/bin/pytest -q tests/gpu

runs the same tests on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, TILEFUSE_CPU_KERNELS=triton,
both set here, so run tests/gpu on its own: the CPU routing is decided when tilefuse is first imported) at shrunk
shapes (_profile.CPU), with the same checks: the kernels launched, nothing fell back to the reference, and the
numerics protocol of _numerics.py.

Every test gets the `kernels` fixture: it records each launch through codegen.emit.launch (the one place every
tilefuse kernel is launched), captures the tilefuse loggers (the CUDA dispatch logs a fallback to the reference at
DEBUG on "tilefuse.codegen"), and fails the test when a fallback or any tilefuse warning was logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _kernel_watch import SPECIALIZATIONS, KernelWatch
from _profile import ON_CPU, OVERRIDE_ENV

import tilefuse  # noqa: F401  (registers the tilefuse:: ops and their CUDA kernels)
from tilefuse.codegen import emit

HERE = Path(__file__).resolve().parent
SEED = 0


def _skip_reason() -> str | None:
    if ON_CPU:
        if not torch._C._dispatch_has_kernel_for_dispatch_key("tilefuse::attention", "CPU"):
            return (
                f"{OVERRIDE_ENV}=cpu, but CPU tensors do not run the Triton kernels: tilefuse was imported before "
                "tests/gpu/_profile.py set TILEFUSE_CPU_KERNELS=triton; run tests/gpu on its own"
            )
        return None
    if not torch.cuda.is_available():
        return (
            "needs a CUDA GPU (torch.cuda.is_available() is False); "
            f"{OVERRIDE_ENV}=cpu checks the test logic on CPU under the Triton interpreter"
        )
    if os.environ.get("TRITON_INTERPRET") == "1":
        return (
            "TRITON_INTERPRET=1 (tests/conftest.py sets it by default) would interpret the kernels instead of "
            "compiling them; run with TRITON_INTERPRET=0"
        )
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def kernels(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[KernelWatch]:
    watch = KernelWatch(caplog)
    real_launch = emit.launch

    def spy(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_launch(kernel, grid, *args, **kwargs)
        watch.record(kernel, grid, args, kwargs)
        return result

    monkeypatch.setattr(emit, "launch", spy)
    torch.manual_seed(SEED)
    with caplog.at_level(logging.DEBUG, logger="tilefuse.codegen"):
        yield watch
    assert not watch.problems(), watch.problems()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SPECIALIZATIONS:
        terminalreporter.write_line(
            f"tests/gpu: {len(SPECIALIZATIONS)} distinct kernel specializations launched "
            f"(kernel, constexprs, dtypes, warps, stages) on {'CPU (interpreter)' if ON_CPU else 'CUDA'}"
        )
