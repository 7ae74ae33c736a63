"""The rope pass: replace every rotary-embedding site by `tilefuse::rope(x, cos, sin, layout, rotary_dim)`.

The op's arguments are kept exactly so: the attention pass later folds rope ops on Q and K into attention when
both share the same cos/sin nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..codegen import custom_ops  # noqa: F401  (registers torch.ops.tilefuse.*)
from ..codegen.reference import ROPE_INTERLEAVED, ROPE_ROTATE_HALF
from ..specs import RopeSpec
from .base import Decline, PassContext, PassResult
from .graph import aten, dtype_of, insert_call, replace_with, static_shape
from .match_common import dtype_name, erase_dead, node_order, same_value
from .rope_match import RopeMatch, match_rope, rope_anchor
from .rope_split import deinterleave, doubled

LAYOUT_CODES = {"rotate_half": ROPE_ROTATE_HALF, "interleaved": ROPE_INTERLEAVED}

# cos/sin per freqs_cis node (complex spelling) or per site, so later sites can share them with earlier ones.
_Tables = dict[fx.Node, tuple[fx.Node, fx.Node]]


@dataclass(frozen=True)
class RopePass:
    """Recognize rotate-half, interleaved, complex and partial-rotary RoPE and rewrite it to tilefuse::rope.

    Every candidate is recorded in `ctx` as fused (on the new rope node) or declined with a reason.
    The graph is left linted and recompiled.
    """

    name: str = "rope"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.is_enabled("rope"):
            return PassResult(gm, False)
        modified = False
        tables: _Tables = {}
        live = set(gm.graph.nodes)
        for node in [n for n in gm.graph.nodes if rope_anchor(n)]:
            if node not in live:
                continue
            try:
                match = match_rope(node)
            except Decline as decline:
                ctx.declined("rope", node, decline.reason, decline.spec)
                continue
            new_node, spec = _rewrite(gm.graph, match, tables)
            ctx.fused("rope", new_node, spec)
            modified = True
            live -= erase_dead(gm.graph, match.nodes)  # later sites' legality checks see only live users
        if modified:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def _rewrite(graph: fx.Graph, m: RopeMatch, tables: _Tables) -> tuple[fx.Node, RopeSpec]:
    if m.freqs is not None:
        cos, sin = tables.get(m.freqs) or _tables_from_freqs(graph, m.freqs)
        tables[m.freqs] = (cos, sin)
    else:
        assert m.cos is not None and m.sin is not None
        cos, sin = _shared(graph, (m.cos, m.sin), m.output, tables)
        if m.half_tables:
            cos, sin = _doubled_tables(graph, (cos, sin), tables)
    with graph.inserting_before(m.output):
        x = deinterleave(graph, m.x, m.rotary_dim) if m.deinterleave else m.x
        args = (x, cos, sin, LAYOUT_CODES[m.layout], m.rotary_dim)
        new_node = insert_call(graph, torch.ops.tilefuse.rope.default, args)
    shape = static_shape(m.x)
    spec = RopeSpec(
        layout=m.layout,
        rotary_dim=m.rotary_dim,
        head_dim=shape[-1] or 0,
        shape=shape,
        dtype=dtype_name(dtype_of(m.x)),
        source=m.source,
    )
    new_node.meta["tilefuse_spec"] = spec
    replace_with(m.output, new_node)
    return new_node, spec


def _shared(
    graph: fx.Graph, cos_sin: tuple[fx.Node, fx.Node], output: fx.Node, tables: _Tables
) -> tuple[fx.Node, fx.Node]:
    """An earlier site's cos/sin when they compute the same values (GPT-J builds them per projection).

    Q and K then name the same nodes, which is what lets the attention pass fold both ropes in.
    """
    order = node_order(graph)
    for earlier in tables.values():
        same = all(same_value(a, b) for a, b in zip(earlier, cos_sin, strict=True))
        if same and all(order[n] < order[output] for n in earlier):
            return earlier
    tables[output] = cos_sin
    return cos_sin


def _doubled_tables(graph: fx.Graph, half: tuple[fx.Node, fx.Node], tables: _Tables) -> tuple[fx.Node, fx.Node]:
    """Rotate-half tables `cat(t, t)` of per-pair tables, placed right after them and built once per pair of
    tables, so that the sites on Q and K name the same nodes."""
    found = tables.get(half[0])
    if found is not None and found[1].args[0][0] is half[1]:  # type: ignore[index]
        return found
    order = node_order(graph)
    point = max(half, key=order.__getitem__).next
    while point.op == "placeholder":
        point = point.next
    with graph.inserting_before(point):
        found = (doubled(graph, half[0]), doubled(graph, half[1]))
    tables[half[0]] = found
    return found


def _tables_from_freqs(graph: fx.Graph, freqs: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Interleaved-layout cos/sin: freqs' real and imaginary parts, each repeated for both features of a pair.

    Placed right after freqs so that every site multiplying by it can share them.
    """
    point = freqs.next
    while point.op == "placeholder":
        point = point.next
    with graph.inserting_before(point):
        parts = insert_call(graph, aten.view_as_real.default, (freqs,))
        halves = [insert_call(graph, aten.select.int, (parts, -1, i)) for i in (0, 1)]
        cos, sin = (insert_call(graph, aten.repeat_interleave.self_int, (h, 2, -1)) for h in halves)
    return cos, sin
