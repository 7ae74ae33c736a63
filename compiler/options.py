"""The one options object of tilefuse, built from keyword arguments or torch.compile's `options=` dict."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..passes.base import FUSION_KINDS

INNER_COMPILERS = ("inductor", "eager")
AUTOTUNE_MODES = ("off", "db", "model", "measure")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Options:
    """How the backend behaves.

    strict: re-raise failures instead of falling back to the unfused graph (tests run strict).
    inner: compiler for everything tilefuse does not fuse ("inductor" or "eager").
    fusions: which rewrite families run (subset of attention, rmsnorm, layernorm, rope, residual).
    autotune: where tile configs come from ("off", "db", "model", "measure").
    log_level: level of the `tilefuse` logger.
    dump_kernels: a folder that receives a copy of every Triton kernel source tilefuse emits (None: no dump).
    tuning_db: the tuning database (file path or URL) autotune reads; None: $TILEFUSE_TUNING_DB or the cache file.
    """

    strict: bool = False
    inner: str = "inductor"
    fusions: frozenset[str] = frozenset(FUSION_KINDS)
    autotune: str = "db"
    log_level: str = "WARNING"
    dump_kernels: str | None = None
    tuning_db: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.strict, bool):
            raise TypeError(f"strict must be a bool, got {self.strict!r}")
        _check_choice("inner", self.inner, INNER_COMPILERS)
        _check_choice("autotune", self.autotune, AUTOTUNE_MODES)
        _check_choice("log_level", self.log_level.upper(), LOG_LEVELS)
        if self.dump_kernels is not None and not isinstance(self.dump_kernels, str):
            raise TypeError(f"dump_kernels must be a folder path (str) or None, got {self.dump_kernels!r}")
        if self.tuning_db is not None and not isinstance(self.tuning_db, str):
            raise TypeError(f"tuning_db must be a file path or database URL (str) or None, got {self.tuning_db!r}")
        unknown = set(self.fusions) - set(FUSION_KINDS)
        if unknown:
            raise ValueError(f"fusions: unknown {sorted(unknown)}; allowed: {list(FUSION_KINDS)}")

    @classmethod
    def from_any(cls, options: Options | Mapping[str, Any] | None = None, **overrides: Any) -> Options:
        """Build from an Options, a dict (torch.compile's `options=`), and/or keyword overrides."""
        if options is None:
            merged: dict[str, Any] = {}
        elif isinstance(options, Options):
            merged = dataclasses.asdict(options)
        elif isinstance(options, Mapping):
            merged = dict(options)
        else:
            raise TypeError(f"options must be a dict or tilefuse.Options, got {type(options).__name__}")
        merged.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(merged) - known
        if unknown:
            raise ValueError(f"unknown tilefuse option(s) {sorted(unknown)}; allowed: {sorted(known)}")
        if "fusions" in merged:
            merged["fusions"] = _as_fusions(merged["fusions"])
        return cls(**merged)


def _as_fusions(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, Iterable):
        return frozenset(str(v) for v in value)
    raise TypeError(f"fusions must be a list of names or a comma-separated string, got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")
