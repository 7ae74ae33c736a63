"""The pass pipeline, top to bottom: canonicalize, RoPE, norms, attention (which absorbs RoPE).

It rewrites the graph and then, with the same passes and context, the body of every checkpoint, `wrap` and
`invoke_subgraph` call in it (compiler/hop_bodies.py): the fused ops end up inside the body, which keeps its meaning
(a checkpoint body is recomputed in the backward, fused ops included), and each body's sites are reported once.
"""

from __future__ import annotations

import torch.fx as fx

from ..passes.base import GraphPass, PassContext
from ..passes.manager import PassManager
from .body_constants import drop_unused_copies, inline_constant_operands
from .hop_bodies import fused_bodies
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
    """Rewrite `gm` and the bodies of its higher-order calls in place; returns it with the context holding every
    site record (a body's sites named `<body>.<node>`)."""
    ctx = PassContext(enabled=options.fusions)
    manager = PassManager(passes if passes is not None else default_passes(), check=True)
    gm = manager(gm, ctx).graph_module
    for name, calls, body in fused_bodies(gm):
        _rewrite_body(manager, name, calls, body, ctx)
    return gm, ctx


def _rewrite_body(
    manager: PassManager, name: str, calls: list[fx.Node], body: fx.GraphModule, ctx: PassContext
) -> None:
    first = len(ctx.sites)
    copies = inline_constant_operands(calls, body)
    result = manager(body, ctx, where=name)
    if result.graph_module is not body:
        raise RuntimeError(f"a pass replaced the body {name} instead of rewriting it in place")
    drop_unused_copies(body, copies)
    for site in ctx.sites[first:]:
        site.node = f"{name}.{site.node}"
