"""Differences between the Triton versions tilefuse supports (3.6 to 3.9), bridged in one place by feature detection.

Each shim checks for the behaviour it works around and leaves a Triton that does not need it untouched.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import numpy as np


def _index_of_scalar_fails(patch_tensor: Any, scope_type: Any) -> bool:
    """Whether the interpreter's `tensor.__index__` rejects a scalar, which it holds as a 1-element array."""

    class Probe:
        handle: Any

    scope = scope_type()
    patch_tensor(Probe, scope)
    probe = Probe()
    probe.handle = SimpleNamespace(data=np.array([3], dtype=np.int32))
    try:
        return int(probe.__index__()) != 3  # type: ignore[attr-defined]
    except TypeError:
        return True
    finally:
        scope.restore()


def patch_interpreter_scalar_index() -> None:
    """Let `range(n)` take a scalar tensor `n` under Triton 3.6's interpreter with NumPy >= 2.4.

    Triton 3.6 turns a scalar into an int by `int(array)` of its 1-element array, which NumPy 2.4 rejects ("only
    0-dimensional arrays can be converted to Python scalars"); later Triton squeezes the array first, as this does.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or getattr(original, "tilefuse_shim", False):
        return
    if not _index_of_scalar_fails(original, scope_type):
        return

    def patch_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_tensor.tilefuse_shim = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_tensor


def apply() -> None:
    """Apply every shim this process needs (the interpreter's only under TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        patch_interpreter_scalar_index()
