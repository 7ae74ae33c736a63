"""The process registry of chosen tile configs, filled at compile time and read by the launchers.

At compile time the backend calls `resolve_sites` once per graph: for every fused site's Spec and every kernel family
the site launches (attention: its forward or decode kernel and its backward; norm: forward and backward; RoPE) it
looks the tuning database up (no search inside torch.compile unless autotune="measure" on a GPU); a miss takes the
cost model's choice, logs it and stores it back as a "model" record so the next compile is a hit. The launchers read
the table `register` writes (codegen/launch_configs.py) by launch key. Nothing here may fail a compile: errors are
logged and leave the launcher's default in place.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tilefuse.codegen.families import family_record, is_static, kernel_family, site_families
from tilefuse.codegen.launch_configs import clear_launch_configs, set_launch_config
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.costmodel.hardware import GPUSpec, current_gpu, get_gpu
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

if TYPE_CHECKING:
    from .db import TuningDB

log = logging.getLogger("tilefuse.autotune")

GPU_ENV = "TILEFUSE_GPU"  # which GPU to tune for when this process has no CUDA device (e.g. "h100")


@dataclass(frozen=True)
class Choice:
    config: TileConfig
    source: str  # "db", "model", "measure"


_lock = threading.Lock()
_choices: dict[tuple[Spec, str], Choice] = {}  # (Spec, kernel family) → choice


def config_for(spec: Spec, kind: str | None = None) -> TileConfig | None:
    """The tile config chosen for kernel family `kind` (default: the Spec's forward family) of `spec` in this
    process, or None (the launcher then uses its default)."""
    with _lock:
        choice = _choices.get((spec, kind or kernel_family(spec)))
    return choice.config if choice is not None else None


def register(spec: Spec, config: TileConfig, source: str, kind: str | None = None) -> None:
    """Make `config` the choice for kernel family `kind` (default: the Spec's forward family) of `spec`."""
    kind = kind or kernel_family(spec)
    key = family_record(kind).launch_key(spec)
    with _lock:
        _choices[(spec, kind)] = Choice(config, source)
    if key is not None:
        set_launch_config(key, config)


def clear() -> None:
    with _lock:
        _choices.clear()
    clear_launch_configs()


def snapshot() -> dict[tuple[Spec, str], Choice]:
    """Every choice of this process, keyed by (Spec, kernel family)."""
    with _lock:
        return dict(_choices)


def target_gpu() -> GPUSpec | None:
    """The current CUDA device's table entry, else $TILEFUSE_GPU's, else None (nothing to tune for)."""
    import torch

    if torch.cuda.is_available():
        return current_gpu()
    name = os.environ.get(GPU_ENV)
    return get_gpu(name) if name else None


def resolve_sites(
    sites: Iterable[Any], mode: str, db_url: str | None = None, training: bool = True
) -> dict[tuple[Spec, str], Choice]:
    """Choose a config for every kernel family of every fused site that launches a kernel (`sites`:
    passes.base.Site records). mode: "db" (database, else cost model), "model" (cost model only), "measure"
    (database, else a GPU search; backward kernels only when `training`, else the cost model's choice)."""
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
    specs = _launched_specs(sites)
    if not specs:
        return {}
    db = _open_db(mode, db_url)
    chosen: dict[tuple[Spec, str], Choice] = {}
    for spec in specs:
        for kind in _families(spec):
            search = mode == "measure" and (training or not kind.endswith("_backward"))
            try:
                choice = _resolve(spec, kind, gpu, search, db)
            except Exception as err:  # a tuning problem must never fail a compile
                log.warning("autotune: no tuned %s config for %s (%s: %s); the launcher default applies", kind,
                            _short(spec), type(err).__name__, err)  # fmt: skip
                continue
            if choice is not None:
                register(spec, choice.config, choice.source, kind)
                chosen[(spec, kind)] = choice
    return chosen


def _launched_specs(sites: Iterable[Any]) -> list[Spec]:
    """The Specs of fused sites with their own kernel (RoPE absorbed into attention launches none), each once."""
    specs: dict[Spec, None] = {}
    for site in sites:
        spec, own_kernel = site.spec, not site.detail.get("fused_into")
        if site.status == "fused" and own_kernel and isinstance(spec, AttentionSpec | NormSpec | RopeSpec):
            specs.setdefault(spec)
    return list(specs)


def _families(spec: Spec) -> tuple[str, ...]:
    try:
        return site_families(spec)
    except (TypeError, ValueError) as err:  # never fails a compile
        log.warning("autotune: %s has no kernel family (%s); the launcher defaults apply", _short(spec), err)
        return ()


def _open_db(mode: str, db_url: str | None) -> TuningDB | None:
    from .db import TuningDB, TuningDBError

    if mode == "model":
        return None
    try:
        return TuningDB(db_url)
    except (TuningDBError, ValueError) as err:
        log.warning("autotune: %s; using the cost model's choices without the tuning db", err)
        return None


def _resolve(spec: Spec, kind: str, gpu: GPUSpec, search: bool, db: TuningDB | None) -> Choice | None:
    from .keys import tuning_key
    from .search import TuneSettings, tune_spec

    with _lock:
        if (spec, kind) in _choices:
            return _choices[(spec, kind)]
    key = tuning_key(spec, gpu.arch, kind=kind)
    record = db.get(key) if db is not None else None
    if record is not None and record.best is not None:
        log.debug("autotune: %s → %s (tuning db, %s)", key.describe(), record.best, record.source)
        return Choice(record.best, "db")
    if not is_static(spec):
        log.info("autotune: %s has dynamic dims and no tuned config; the launcher default applies", key.describe())
        return None
    measure_here = search and _has_cuda()
    start = time.perf_counter()
    outcome = tune_spec(spec, gpu, TuneSettings(mode="measure" if measure_here else "model"), kind=kind, db=db)
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
    if isinstance(spec, AttentionSpec):
        return f"attention {spec.q_len}x{spec.kv_len} d{spec.head_dim}"
    return f"{spec.kind} {list(getattr(spec, 'shape', ()))}"
