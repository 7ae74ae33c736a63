"""Bodies of higher-order ops (activation checkpointing, `wrap`, `invoke_subgraph`): retraced with the graph, then
rewritten by the passes in place, so the fused ops live inside the body and keep its semantics (a checkpoint body is
still recomputed in the backward, with the fused ops in it).

Dynamo keeps `torch.utils.checkpoint` (reentrant or not, HF's gradient checkpointing included) as a
`tag_activation_checkpoint` call and `torch.compiler.nested_compile_region` as `invoke_subgraph`, each with its body
as a GraphModule attribute; make_fx(pre_dispatch=True) keeps those calls and retraces their bodies to ATen. Two
torch quirks are worked around here: the pre-dispatch tracer of `tag_activation_checkpoint` copies the body's
`_checkpoint_context_fn` unconditionally (a KeyError for plain checkpointing), and it traces bodies below autograd,
so `invoke_subgraph` would read every body output as non-differentiable from the recorded fake values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx

CONTEXT_FN = "_checkpoint_context_fn"
# Higher-order ops whose body is an ordinary function of its operands: rewriting inside it is rewriting that function.
# Others (cond branches, flex_attention score mods, autocast regions, ...) are left as they are.
FUSED_BODY_OPS = frozenset({"tag_activation_checkpoint", "invoke_subgraph", "wrap"})


def hop_name(node: fx.Node) -> str | None:
    """The name of the higher-order op `node` calls, None for any other node."""
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    return None


def _body_calls(gm: fx.GraphModule, ops: frozenset[str] | None) -> Iterator[tuple[fx.Node, str, fx.GraphModule]]:
    """(call node, attribute name, body) for every body a higher-order op of `ops` (None: any) calls in `gm`."""
    for node in gm.graph.nodes:
        name = hop_name(node)
        if name is None or (ops is not None and name not in ops):
            continue
        for arg in node.args:
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                body = getattr(gm, str(arg.target), None)
                if isinstance(body, fx.GraphModule):
                    yield node, str(arg.target), body


def _body_attrs(gm: fx.GraphModule, ops: frozenset[str] | None) -> Iterator[tuple[str, str, fx.GraphModule]]:
    for node, attr, body in _body_calls(gm, ops):
        yield str(hop_name(node)), attr, body


def fused_bodies(gm: fx.GraphModule) -> list[tuple[str, list[fx.Node], fx.GraphModule]]:
    """Every distinct body the passes rewrite, nested ones included, parents first: (qualified name, every call of
    it anywhere in `gm`, body).

    A body shared by several calls (an `invoke_subgraph` region reused across layers) is listed once, so its sites
    are rewritten and reported once."""
    found: dict[int, tuple[str, list[fx.Node], fx.GraphModule]] = {}

    def walk(module: fx.GraphModule, prefix: str) -> None:
        for call, attr, body in _body_calls(module, FUSED_BODY_OPS):
            if id(body) in found:
                found[id(body)][1].append(call)
                continue
            found[id(body)] = (f"{prefix}{attr}", [call], body)
            walk(body, f"{prefix}{attr}.")

    walk(gm, "")
    return list(found.values())


class _MetaWithoutContextFn(dict[str, Any]):
    """A checkpoint body's meta when the user gave no `context_fn`: `in` still says no (plain checkpointing), while
    torch's pre-dispatch tracer, which copies the entry unconditionally, reads None instead of raising KeyError."""

    def __missing__(self, key: str) -> Any:
        if key == CONTEXT_FN:
            return None
        raise KeyError(key)


def _checkpoint_bodies(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    for name, _, body in _body_attrs(gm, None):
        if name == "tag_activation_checkpoint":
            yield body
        yield from _checkpoint_bodies(body)


@contextmanager
def retraceable_hops(gm: fx.GraphModule) -> Iterator[None]:
    """Around make_fx(pre_dispatch=True) of Dynamo's `gm`: checkpoint bodies without a context_fn trace without
    KeyError, and invoke_subgraph's per-compile cache (kept in Dynamo's TracingContext) sees nothing of the retrace,
    so AOTAutograd later traces the rewritten bodies, not the retraced ones it would otherwise find cached."""
    with _context_fn_readable(gm), _isolated_hop_cache():
        yield


@contextmanager
def _context_fn_readable(gm: fx.GraphModule) -> Iterator[None]:
    patched = [(body, body.meta) for body in _checkpoint_bodies(gm) if CONTEXT_FN not in body.meta]
    for body, meta in patched:
        body.meta = _MetaWithoutContextFn(meta)
    try:
        yield
    finally:
        for body, meta in patched:
            body.meta = meta


@contextmanager
def _isolated_hop_cache() -> Iterator[None]:
    tracing = torch._guards.TracingContext.try_get()
    if tracing is None:
        yield
        return
    saved = tracing.hop_dispatch_set_cache
    tracing.hop_dispatch_set_cache = torch._guards.HopDispatchSetCache()
    try:
        yield
    finally:
        tracing.hop_dispatch_set_cache = saved


def drop_empty_context_fns(gm: fx.GraphModule) -> None:
    """Remove the None context_fn the retrace copied into checkpoint bodies (see `retraceable_hops`): torch's
    checkpoint runs a body that has the entry with it, and there is none to run."""
    for body in _checkpoint_bodies(gm):
        if CONTEXT_FN in body.meta and body.meta[CONTEXT_FN] is None:
            del body.meta[CONTEXT_FN]


def prepare_bodies_for_autograd(gm: fx.GraphModule) -> None:
    """Before AOTAutograd: forget the fake values of `invoke_subgraph` body outputs.

    invoke_subgraph decides which body outputs need a gradient from those values when present, and the retrace
    recorded them below autograd (requires_grad=False for all); without them it runs the body on the call's inputs,
    as it does for Dynamo's own bodies, which carry no such values."""
    for name, _, body in _body_attrs(gm, None):
        if name == "invoke_subgraph":
            (outputs,) = body.graph.find_nodes(op="output")[0].args
            for out in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
                if isinstance(out, fx.Node):
                    out.meta.pop("val", None)
        prepare_bodies_for_autograd(body)
