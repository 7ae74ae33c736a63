"""The tile configs launchers run with, keyed by what a launcher can see: codegen owns this table, autotune fills it.

A launch key names one launch's kernel family, the flags that select its kernel variant and its sizes bucketed like
tuning keys. It is computed alike from a site's Spec at compile time (each kernel family's `launch_key`, when autotune
registers the config it chose) and from the tensors at launch time (codegen/gpu.py), both with the key builders here, so
a chosen config reaches its launches with one dict lookup. A dynamic dim buckets to "dyn" on the Spec side and never
matches a launch: such sites keep the launcher defaults. codegen imports neither autotune nor the cost model: they write
here (`set_launch_config`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tile_config import TileConfig

LaunchKey = tuple[Any, ...]
DYNAMIC = "dyn"

_lock = threading.Lock()
_by_launch: dict[LaunchKey, TileConfig] = {}
_override: contextvars.ContextVar[TileConfig | None] = contextvars.ContextVar("tilefuse_tile_config", default=None)


# ------------------------------------------------------------------------------------------------- the table
@contextlib.contextmanager
def launch_config(config: TileConfig | None) -> Iterator[None]:
    """Within the block, FA2 attention forward launches use `config` (tilefuse.ops.attention's `config=`)."""
    token = _override.set(config)
    try:
        yield
    finally:
        _override.reset(token)


def active() -> bool:
    """Whether any launch may get a config (the launchers' fast path: nothing chosen, no key to compute)."""
    return bool(_by_launch) or _override.get() is not None


def config_for_launch(key: LaunchKey) -> TileConfig | None:
    """The config for a launch with this key: an explicit `launch_config` for the FA2 forward, else the one set for
    that key, else None (the launcher's default)."""
    if key[0] == "attention":
        explicit = _override.get()
        if explicit is not None:
            return explicit
    with _lock:
        return _by_launch.get(key)


def set_launch_config(key: LaunchKey, config: TileConfig) -> None:
    with _lock:
        _by_launch[key] = config


def clear_launch_configs() -> None:
    with _lock:
        _by_launch.clear()


# ------------------------------------------------------------------------------------------------- the keys
def bucket_dim(dim: int | None) -> int | str:
    """Shape dims bucket to the next power of two (1, 2, 4, ..., 17 → 32); a dynamic dim stays "dyn"."""
    if dim is None:
        return DYNAMIC
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
        raise ValueError(f"a shape dim must be an int >= 0 or None, got {dim!r}")
    return 1 if dim <= 1 else 1 << (dim - 1).bit_length()


def _dtype(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def attention_key(
    kind: str, head_dim: int, v_head_dim: int, dtype: object, group: int, q_len: int | None, kv_len: int | None,
    causal: bool, window: bool, softcap: bool, alibi: bool, mask: bool, rope: bool, dropout: bool,
) -> LaunchKey:  # fmt: skip
    """An attention launch of kernel family `kind` ("attention", "attention_decode", "attention_backward")."""
    return (kind, head_dim, v_head_dim, _dtype(dtype), group, bucket_dim(q_len), bucket_dim(kv_len), causal, window,
            softcap, alibi, mask, rope, dropout)  # fmt: skip


def norm_key(
    kind: str, rms: bool, width: int, rows: int | None, dtype: object, has_weight: bool, has_bias: bool,
    residual: bool,
) -> LaunchKey:  # fmt: skip
    """A norm launch of family "norm" or "norm_backward" (the backward kernel reads neither bias nor residual)."""
    if kind == "norm_backward":
        has_bias = residual = False
    return (kind, rms, width, bucket_dim(rows), _dtype(dtype), has_weight, has_bias, residual)


def rope_key(layout: int, head_dim: int, rotary_dim: int, rows: int | None, dtype: object) -> LaunchKey:
    """A RoPE launch, forward or backward (both run the one kernel with the family "rope" knobs)."""
    return ("rope", layout, head_dim, rotary_dim, bucket_dim(rows), _dtype(dtype))


def shape_rows(shape: tuple[int | None, ...]) -> int | None:
    """Rows of a norm or RoPE operand (every dim but the last); None when one of them is dynamic or there are none."""
    if not shape or None in shape[:-1]:
        return None
    return math.prod(int(d) for d in shape[:-1] if d is not None)
