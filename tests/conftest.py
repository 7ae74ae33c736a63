"""Session-wide test setup.

Triton decides at decoration time whether `@triton.jit` builds a compiled kernel or an interpreted one, so the
interpreter must be switched on before any test module imports a kernel module: CPU runs of the kernels need it,
and a kernel emitted later (codegen/emit.py) calls helpers decorated when their module was first imported. Tests
that compile for a real GPU target do so in a child process without it (tests/codegen/_sm90.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# ...but the tilefuse:: ops on CPU tensors keep their reference implementations (fast, and what the pass and model
# tests compare against); kernel tests call the launchers directly, and test_ops checks the interpreter routing.
os.environ.setdefault("TILEFUSE_CPU_KERNELS", "reference")
