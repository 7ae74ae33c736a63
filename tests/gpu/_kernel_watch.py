"""Which kernels a test launched, and what tilefuse logged meanwhile (the `kernels` fixture of conftest.py)."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import pytest
import torch
from _profile import ON_CPU

from tilefuse.codegen import emit

FALLBACK_MESSAGE = "runs the reference"  # codegen/gpu.py's DEBUG record of a launch that fell back


class Launch(NamedTuple):
    kernel: str
    grid: tuple[int, ...]
    constexprs: dict[str, Any]
    dtypes: tuple[str, ...]


SPECIALIZATIONS: set[tuple[str, ...]] = set()  # for the session summary: about what Triton compiled


class KernelWatch:
    """The kernel launches and tilefuse log records of one test."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.launches: list[Launch] = []
        self.interpreted: list[str] = []
        self._caplog = caplog

    def record(self, kernel: Any, grid: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = kernel.fn.__name__
        names = set(emit.constexpr_names(kernel))
        constexprs = {k: v for k, v in kwargs.items() if k in names}
        dtypes = tuple(str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor))
        self.launches.append(Launch(name, tuple(grid) if isinstance(grid, tuple) else (), constexprs, dtypes))
        if type(kernel).__name__ == "InterpretedFunction":
            self.interpreted.append(name)
        options = {k: kwargs.get(k) for k in ("num_warps", "num_stages")}  # compile options, not constexprs
        SPECIALIZATIONS.add((name, repr(sorted(constexprs.items())), repr(dtypes), repr(options)))

    @property
    def names(self) -> set[str]:
        return {launch.kernel for launch in self.launches}

    def problems(self) -> list[str]:
        """Fallbacks to the reference and warnings logged by tilefuse."""
        return [
            f"{r.name}: {r.getMessage()}"
            for r in self._caplog.records
            if r.name.startswith("tilefuse") and (r.levelno >= logging.WARNING or FALLBACK_MESSAGE in r.getMessage())
        ]

    def assert_ran(self, *kernels: str) -> None:
        """Each named kernel launched, compiled (not interpreted) on the GPU, and nothing fell back or warned."""
        assert not self.problems(), self.problems()
        missing = set(kernels) - self.names
        assert not missing, f"kernels {sorted(missing)} did not run; launched: {sorted(self.names)}"
        if not ON_CPU:
            assert not self.interpreted, f"interpreted, not compiled: {sorted(set(self.interpreted))}"

    def of(self, kernel: str) -> list[Launch]:
        return [launch for launch in self.launches if launch.kernel == kernel]
