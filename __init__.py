"""tilefuse: recognize attention, norms and RoPE in PyTorch graphs and run them as fused, tiled kernels.

`torch.compile(model, backend="tilefuse")` works once the package is installed; `tilefuse.compile`,
`tilefuse.export` and `tilefuse.explain` are the Python entry points.
"""

from __future__ import annotations

import importlib as _importlib
import sys as _sys

__version__ = "0.1.0"

if __name__ != "tilefuse":
    # The repository root is the package. A tool that imports the root by path (pytest imports a rootdir holding
    # an __init__.py as package "<dirname>") would otherwise run it a second time under another name and
    # re-register the tilefuse:: ops, which destroys the first registration. Hand it the real package instead.
    _sys.modules[__name__] = _importlib.import_module("tilefuse")
else:
    from . import ops
    from .codegen import cuda_kernels as _cuda_kernels  # noqa: F401  (CUDA kernels behind the ops)
    from .codegen import custom_ops as _custom_ops  # noqa: F401  (registers the tilefuse:: ops)
    from .compiler.api import explain, export
    from .compiler.backend import GLOBAL_REPORT, TilefuseBackend, compile
    from .compiler.options import Options
    from .compiler.report import FusionReport
    from .specs import AttentionSpec, NormSpec, RopeSpec

__all__ = [
    "GLOBAL_REPORT",
    "AttentionSpec",
    "FusionReport",
    "NormSpec",
    "Options",
    "RopeSpec",
    "TilefuseBackend",
    "compile",
    "explain",
    "export",
    "ops",
]
