"""Count the bytes Triton kernels really load and store, by running them under the interpreter (TRITON_INTERPRET=1).

    with count_io() as io:
        attention_forward_triton(inputs, flags)
    io.read_bytes, io.write_bytes

Every `tl.load` / `tl.store` (masked or not) goes through `InterpreterBuilder.create_masked_load/store` in
`triton/runtime/interpreter.py`; inside `watch_memory` those two methods are wrapped to call a hook, and `count_io`'s
hook adds `count_nonzero(mask) × element size` of the pointer's element type. Masked-off lanes do not count; repeated
loads of one address each count (the convention of `codegen/plan.py`). Tensor-descriptor (TMA) loads/stores are not
counted: no kernel uses them yet. The patch is process-wide while the block runs and is removed on exit (also on
error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class IOCount:
    read_bytes: int = 0
    write_bytes: int = 0
    loads: int = 0  # load calls (one per tl.load per program)
    stores: int = 0


def _element_bytes(ptrs: Any) -> int:
    bits = int(ptrs.get_element_ty().primitive_bitwidth)
    return (bits + 7) // 8  # int1 (bool) pointers still move a byte per element


def _active(ptrs: Any, mask: Any) -> int:
    return int(np.count_nonzero(np.broadcast_to(np.asarray(mask.data), np.shape(ptrs.data))))


MemoryHook = Callable[[Any, Any], None]  # (pointer handle, mask handle) of one masked load or store


@contextmanager
def watch_memory(on_load: MemoryHook | None = None, on_store: MemoryHook | None = None) -> Iterator[None]:
    """Call `on_load` / `on_store` with the pointers and mask of every load / store of interpreted Triton kernels
    launched inside the block."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    orig_load = builder.create_masked_load
    orig_store = builder.create_masked_store

    # The trailing cache arguments differ by Triton version (3.6: cache_modifier, eviction_policy; 3.9:
    # cache_policy), so they are passed through untouched.
    def load(self: Any, ptrs: Any, mask: Any, *args: Any, **kwargs: Any) -> Any:
        if on_load is not None:
            on_load(ptrs, mask)
        return orig_load(self, ptrs, mask, *args, **kwargs)

    def store(self: Any, ptrs: Any, value: Any, mask: Any, *args: Any, **kwargs: Any) -> Any:
        if on_store is not None:
            on_store(ptrs, mask)
        return orig_store(self, ptrs, value, mask, *args, **kwargs)

    builder.create_masked_load = load
    builder.create_masked_store = store
    try:
        yield
    finally:
        builder.create_masked_load = orig_load
        builder.create_masked_store = orig_store


@contextmanager
def count_io() -> Iterator[IOCount]:
    """Sum the bytes loaded/stored by interpreted Triton kernels launched inside the block."""
    counts = IOCount()

    def load(ptrs: Any, mask: Any) -> None:
        counts.read_bytes += _active(ptrs, mask) * _element_bytes(ptrs)
        counts.loads += 1

    def store(ptrs: Any, mask: Any) -> None:
        counts.write_bytes += _active(ptrs, mask) * _element_bytes(ptrs)
        counts.stores += 1

    with watch_memory(load, store):
        yield counts
