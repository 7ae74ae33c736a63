"""Count the bytes Triton kernels really load and store, by running them under the interpreter (TRITON_INTERPRET=1).

    with count_io() as io:
        attention_forward_triton(inputs, flags)
    io.read_bytes, io.write_bytes

Every `tl.load` / `tl.store` (masked or not) goes through `InterpreterBuilder.create_masked_load/store` in
`triton/runtime/interpreter.py`; inside the context manager those two methods are wrapped to add
`count_nonzero(mask) × element size` of the pointer's element type. Masked-off lanes do not count; repeated loads of
one address each count (the convention of `codegen/plan.py`). Tensor-descriptor (TMA) loads/stores are not counted:
no kernel uses them yet. The patch is process-wide while the block runs and is removed on exit (also on error).
"""

from __future__ import annotations

from collections.abc import Iterator
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


@contextmanager
def count_io() -> Iterator[IOCount]:
    """Sum the bytes loaded/stored by interpreted Triton kernels launched inside the block."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    orig_load = builder.create_masked_load
    orig_store = builder.create_masked_store
    counts = IOCount()

    def load(self: Any, ptrs: Any, mask: Any, other: Any, cache_policy: Any, is_volatile: Any) -> Any:
        counts.read_bytes += _active(ptrs, mask) * _element_bytes(ptrs)
        counts.loads += 1
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self: Any, ptrs: Any, value: Any, mask: Any, cache_policy: Any) -> Any:
        counts.write_bytes += _active(ptrs, mask) * _element_bytes(ptrs)
        counts.stores += 1
        return orig_store(self, ptrs, value, mask, cache_policy)

    builder.create_masked_load = load
    builder.create_masked_store = store
    try:
        yield counts
    finally:
        builder.create_masked_load = orig_load
        builder.create_masked_store = orig_store
