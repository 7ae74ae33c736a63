"""The pass pipeline, top to bottom: canonicalize, RoPE, norms, attention (which absorbs RoPE)."""

from __future__ import annotations

import torch.fx as fx

from ..passes.base import GraphPass, PassContext
from ..passes.manager import PassManager
from .options import Options


def default_passes() -> list[GraphPass]:
    from ..passes.attention import AttentionPass
    from ..passes.canonicalize import CanonicalizePass
    from ..passes.norms import NormPass
    from ..passes.rope import RopePass

    return [CanonicalizePass(), RopePass(), NormPass(), AttentionPass()]


def run_pipeline(
    gm: fx.GraphModule, options: Options, passes: list[GraphPass] | None = None
) -> tuple[fx.GraphModule, PassContext]:
    """Rewrite `gm` in place; returns it with the context holding every site record."""
    ctx = PassContext(enabled=options.fusions)
    result = PassManager(passes if passes is not None else default_passes(), check=True)(gm, ctx)
    return result.graph_module, ctx
