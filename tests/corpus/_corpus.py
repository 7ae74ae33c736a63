"""The spelling corpus: one meaning (attention, a norm, RoPE, a mask), written the way each library writes it.

Every entry is a small module written in this project after reading how a library spells the meaning (Hugging
Face, diffusers, torchtune, x-transformers, timm, litgpt, nanoGPT, hand-written variants), with what the whole
tilefuse pipeline must make of it: which sites fuse, which are declined (look-alikes that are not the meaning).
`check` compiles the entry with the tilefuse backend, compares its output and gradients with eager, and counts the
fused ops that actually executed (torch.profiler), so a rewrite that the report claims but that never runs fails.
Outputs must keep eager's strides too: code after a fused site may view them. An entry that imports a library of
the `zoo` extra is skipped where that library is not installed.
"""

from __future__ import annotations

import copy
import importlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tilefuse.benchmarks.harness import EXECUTED_OPS, executed_ops, output_tensors, weighted_loss
from tilefuse.compiler.backend import TilefuseBackend
from tilefuse.compiler.options import Options

# The libraries of the `zoo` extra (pyproject.toml) that corpus entries import, by their top-level module names.
ZOO_LIBRARIES = frozenset({"diffusers", "torchtune", "torchao", "x_transformers", "einops", "einx"})


@dataclass(frozen=True)
class Spelling:
    """One way of writing a meaning, and what tilefuse must make of it.

    `build()` returns the module (or plain function) and its example inputs; every floating input and parameter
    is checked for its gradient unless `train` is False. `fused` counts sites the report must list as fused, by
    kind; `declined` counts sites it must list as declined (look-alikes); kinds not named must have no fused site.
    `check_specs` receives the fused specs by kind for checks of what was recognized (layout, causal, eps...).
    """

    name: str
    source: str
    build: Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]
    fused: dict[str, int] = field(default_factory=dict)
    declined: dict[str, int] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()  # each a part of some declined site's reason (a decline must say why truly)
    check_specs: Callable[[dict[str, list[Any]]], None] | None = None
    train: bool = True
    atol: float = 1e-5
    rtol: float = 1e-5

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def _floating(values: Sequence[Any]) -> list[Tensor]:
    return [v for v in values if isinstance(v, Tensor) and v.is_floating_point()]


def _params(fn: Any) -> list[Tensor]:
    return [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, nn.Module) else []


@contextmanager
def skip_without_zoo() -> Iterator[None]:
    """Skip the test when the code inside fails to import a zoo library that is not installed. An import error
    from an installed library (a class renamed or moved) is raised: the entry must then fail, not skip."""
    try:
        yield
    except ModuleNotFoundError as err:
        library = (err.name or "").split(".")[0]
        if library in ZOO_LIBRARIES and not _importable(library):
            pytest.skip(f"{library} (the zoo extra) is not installed: {err}")
        raise


def _importable(library: str) -> bool:
    try:
        importlib.import_module(library)
    except ImportError:
        return False
    return True


def check(spelling: Spelling) -> dict[str, list[Any]]:
    """Compile `spelling` with tilefuse; assert its sites, numerics and executed ops. Returns fused specs by kind."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    with skip_without_zoo():  # entries import their library when built or first run, eagerly below
        fn, inputs = spelling.build()
    twin = copy.deepcopy(fn) if isinstance(fn, nn.Module) else fn
    backend = TilefuseBackend(Options(inner="eager"))
    compiled = torch.compile(twin, backend=backend)
    train = spelling.train and bool(_floating(inputs) or _params(fn))

    ours_in = [v.detach().clone().requires_grad_(train) if isinstance(v, Tensor) and v.is_floating_point() else v
               for v in inputs]  # fmt: skip
    eager_in = [v.detach().clone().requires_grad_(train) if isinstance(v, Tensor) and v.is_floating_point() else v
                for v in inputs]  # fmt: skip
    with torch.set_grad_enabled(train):
        with skip_without_zoo():
            expected = output_tensors(fn(*eager_in))
        got, ops = executed_ops(lambda: output_tensors(compiled(*ours_in)))
    assert len(got) == len(expected)
    for a, e in zip(got, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        assert a.stride() == e.stride(), ("output strides differ from eager's", a.stride(), e.stride())
        torch.testing.assert_close(a, e, atol=spelling.atol, rtol=spelling.rtol)

    report = backend.report
    assert not report.fallbacks, report.fallbacks
    fused: Counter[str] = Counter(s.kind for s in report.sites if s.status == "fused")
    declined: Counter[str] = Counter(s.kind for s in report.sites if s.status == "declined")
    reasons = [(s.kind, s.reason) for s in report.sites if s.status == "declined"]
    assert dict(fused) == spelling.fused, (dict(fused), reasons)
    for kind, count in spelling.declined.items():
        assert declined[kind] == count, (kind, dict(declined), reasons)
    for part in spelling.reasons:
        assert any(part in (reason or "") for _, reason in reasons), (part, reasons)
    for kind in spelling.fused:  # the fused op of every fused kind ran
        assert any(ops[op] for op in EXECUTED_OPS[kind]), (kind, dict(ops))

    if train:
        weighted_loss(got).backward()  # the same seeded weights on both sides (shapes are equal, checked above)
        weighted_loss(expected).backward()
        ours = _floating(ours_in) + _params(twin)
        eager = _floating(eager_in) + _params(fn)
        for a, e in zip(ours, eager, strict=True):
            assert (a.grad is None) == (e.grad is None), "a gradient one side has and the other lacks"
            if e.grad is not None:
                assert a.grad is not None
                torch.testing.assert_close(a.grad, e.grad, atol=10 * spelling.atol, rtol=10 * spelling.rtol)

    specs: dict[str, list[Any]] = {}
    for site in report.sites:
        if site.status == "fused":
            specs.setdefault(site.kind, []).append(site.spec)
    if spelling.check_specs is not None:
        spelling.check_specs(specs)
    return specs
