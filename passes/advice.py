"""Fixable reasons a site falls off the fused path, told to the user once per process with the fix.

A decline the user can act on (reentrant checkpointing, `need_weights=True`, a PyTorch fast path, ...) is worth one
warning through the `tilefuse` logger that names the fix; repeating it for every layer and every recompile would
bury it. `advise` logs a reason the first time its key is seen and records it for the fusion report either way.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

log = logging.getLogger("tilefuse")


@dataclass(frozen=True)
class Advice:
    """One fixable reason: a stable key (e.g. "reentrant_checkpoint"), what happened, and what to do."""

    key: str
    problem: str
    fix: str

    def message(self) -> str:
        return f"{self.problem}; fix: {self.fix}"


_lock = threading.Lock()
_told: dict[str, Advice] = {}


def advise(key: str, problem: str, fix: str) -> Advice:
    """Warn once per process for `key` (the first call's wording wins) and return the Advice for the report."""
    advice = Advice(key, problem, fix)
    with _lock:
        first = key not in _told
        if first:
            _told[key] = advice
    if first:
        log.warning("tilefuse: %s", advice.message())
    return advice


def advice_given() -> list[Advice]:
    """Every Advice warned about in this process, in the order first seen."""
    with _lock:
        return list(_told.values())


def forget_advice() -> None:
    """Let every key warn again (tests)."""
    with _lock:
        _told.clear()
