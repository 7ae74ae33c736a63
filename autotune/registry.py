"""The process registry of chosen tile configs, filled at compile time and read by the launchers.

At compile time the backend calls `resolve_sites` once per graph: for every fused site's Spec it looks the tuning
database up (no search inside torch.compile unless autotune="measure" on a GPU); a miss takes the cost model's
choice, logs it and stores it back as a "model" record so the next compile is a hit. `config_for(spec)` is what the
launchers ask. Nothing here may fail a compile: errors are logged and leave the launcher's default in place.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tilefuse.codegen.plan import TileConfig
from tilefuse.costmodel.hardware import GPUSpec, current_gpu, get_gpu
from tilefuse.specs import AttentionSpec, Spec

if TYPE_CHECKING:
    from .db import TuningDB

log = logging.getLogger("tilefuse.autotune")

GPU_ENV = "TILEFUSE_GPU"  # which GPU to tune for when this process has no CUDA device (e.g. "h100")


@dataclass(frozen=True)
class Choice:
    config: TileConfig
    source: str  # "db", "model", "measure"


_lock = threading.Lock()
_choices: dict[Spec, Choice] = {}
_by_launch: dict[tuple[Any, ...], TileConfig] = {}  # the same choices, keyed as a launcher can see them


def launch_key(
    head_dim: int, v_head_dim: int, dtype: str, group: int, q_len: int | None, kv_len: int | None, causal: bool,
    window: bool, softcap: bool, alibi: bool, mask: bool, rope: bool, dropout: bool,
) -> tuple[Any, ...]:  # fmt: skip
    """What selects a tile config at launch time: the kernel variant and the bucketed sequence lengths."""
    from .keys import bucket_dim

    return (head_dim, v_head_dim, dtype.removeprefix("torch."), group, bucket_dim(q_len), bucket_dim(kv_len),
            causal, window, softcap, alibi, mask, rope, dropout)  # fmt: skip


def _spec_launch_key(spec: AttentionSpec) -> tuple[Any, ...]:
    return launch_key(
        spec.head_dim, spec.v_head_dim, spec.dtype, spec.gqa_group, spec.q_len, spec.kv_len, spec.causal,
        bool(spec.window), bool(spec.softcap), spec.alibi, spec.mask != "none", spec.rope is not None,
        spec.dropout_p > 0,
    )  # fmt: skip


_override: contextvars.ContextVar[TileConfig | None] = contextvars.ContextVar("tilefuse_tile_config", default=None)


@contextlib.contextmanager
def launch_config(config: TileConfig | None) -> Iterator[None]:
    """Within the block, attention forward launches use `config` (tilefuse.ops.attention's `config=`)."""
    token = _override.set(config)
    try:
        yield
    finally:
        _override.reset(token)


def config_for_launch(key: tuple[Any, ...]) -> TileConfig | None:
    """The config for a launch with this `launch_key`: an explicit `launch_config`, else the one chosen at compile
    time for a site with that key, else None (the launcher's default)."""
    explicit = _override.get()
    if explicit is not None:
        return explicit
    with _lock:
        return _by_launch.get(key)


def config_for(spec: Spec) -> TileConfig | None:
    """The tile config chosen for `spec` in this process, or None (the launcher then uses its default)."""
    with _lock:
        choice = _choices.get(spec)
    return choice.config if choice is not None else None


def register(spec: Spec, config: TileConfig, source: str) -> None:
    with _lock:
        _choices[spec] = Choice(config, source)
        if isinstance(spec, AttentionSpec):
            _by_launch[_spec_launch_key(spec)] = config


def clear() -> None:
    with _lock:
        _choices.clear()
        _by_launch.clear()


def snapshot() -> dict[Spec, Choice]:
    with _lock:
        return dict(_choices)


def target_gpu() -> GPUSpec | None:
    """The current CUDA device's table entry, else $TILEFUSE_GPU's, else None (nothing to tune for)."""
    import torch

    if torch.cuda.is_available():
        return current_gpu()
    name = os.environ.get(GPU_ENV)
    return get_gpu(name) if name else None


def resolve_sites(sites: Iterable[Any], mode: str, db_url: str | None = None) -> dict[Spec, Choice]:
    """Choose a config for every fused attention site with static shapes (`sites`: passes.base.Site records).
    mode: "db" (database, else cost model), "model" (cost model only), "measure" (database, else a GPU search)."""
    if mode == "off":
        return {}
    try:
        gpu = target_gpu()
    except (ValueError, RuntimeError) as err:
        log.warning("autotune: %s; tile configs stay at the launcher defaults", err)
        return {}
    if gpu is None:
        log.debug("autotune: no CUDA device and no %s: tile configs stay at the launcher defaults", GPU_ENV)
        return {}
    specs = {s.spec for s in sites if s.status == "fused" and isinstance(s.spec, AttentionSpec)}
    if not specs:
        return {}
    db = _open_db(mode, db_url)
    chosen: dict[Spec, Choice] = {}
    for spec in specs:
        try:
            choice = _resolve(spec, gpu, mode, db)
        except Exception as err:  # a tuning problem must never fail a compile
            log.warning("autotune: no tuned config for %s (%s: %s); the launcher default applies",
                        _short(spec), type(err).__name__, err)  # fmt: skip
            continue
        if choice is not None:
            register(spec, choice.config, choice.source)
            chosen[spec] = choice
    return chosen


def _open_db(mode: str, db_url: str | None) -> TuningDB | None:
    from .db import TuningDB, TuningDBError

    if mode == "model":
        return None
    try:
        return TuningDB(db_url)
    except (TuningDBError, ValueError) as err:
        log.warning("autotune: %s; using the cost model's choices without the tuning db", err)
        return None


def _resolve(spec: AttentionSpec, gpu: GPUSpec, mode: str, db: TuningDB | None) -> Choice | None:
    from .keys import tuning_key
    from .search import TuneSettings, tune_spec
    from .space import is_static

    with _lock:
        if spec in _choices:
            return _choices[spec]
    key = tuning_key(spec, gpu.arch)
    record = db.get(key) if db is not None else None
    if record is not None and record.best is not None:
        log.debug("autotune: %s → %s (tuning db, %s)", key.describe(), record.best, record.source)
        return Choice(record.best, "db")
    if not is_static(spec):
        log.info("autotune: %s has dynamic dims and no tuned config; the launcher default applies", key.describe())
        return None
    measure_here = mode == "measure" and _has_cuda()
    start = time.perf_counter()
    outcome = tune_spec(spec, gpu, TuneSettings(mode="measure" if measure_here else "model"), db=db)
    best = outcome.record.best
    if best is None:
        return None
    log.info("autotune: %s missed the tuning db; %s chose %s in %.2f s", key.describe(),
             "a GPU search" if measure_here else "the cost model", best, time.perf_counter() - start)  # fmt: skip
    return Choice(best, "measure" if measure_here else "model")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _short(spec: Spec) -> str:
    return f"{spec.kind} {getattr(spec, 'q_len', '')}x{getattr(spec, 'kv_len', '')} d{getattr(spec, 'head_dim', '')}"
