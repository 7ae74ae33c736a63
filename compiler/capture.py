"""Capture: turn a Dynamo graph, a module or a function into a pre-dispatch ATen graph with fake metadata.

Pre-dispatch ATen (the level torch.export's training IR uses) sits before autograd, keeps composite ops such as
`matmul`, `softmax`, `linear`, `layer_norm` and `scaled_dot_product_attention` whole, and records a fake tensor in
every node's `meta["val"]`, so the passes can read shapes and dtypes without running anything.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.split_module import split_module

from ..passes.fastpath import FAST_PATH_DECOMPOSITIONS
from .hop_bodies import drop_empty_context_fns, retraceable_hops


class CaptureDeclined(Exception):
    """The graph cannot be retraced without changing what it computes; the caller compiles it unfused."""


def _is_autograd_function(node: fx.Node) -> bool:
    """A call of Dynamo's higher-order op for a custom autograd.Function (forward and backward bodies attached)."""
    target = node.target
    return (
        node.op == "call_function"
        and isinstance(target, torch._ops.HigherOrderOperator)
        and target.name() == "autograd_function_apply"
    )


def _check_retraceable(gm: fx.GraphModule) -> None:
    """Retracing runs a custom autograd.Function's forward under no_grad and loses its backward: refuse."""
    for node in gm.graph.nodes:
        if _is_autograd_function(node):
            raise CaptureDeclined(
                f"graph calls a custom autograd.Function ({node.name}) with grad enabled; retracing it would "
                "drop its backward, so this graph is left unfused (it fuses under torch.no_grad)"
            )


def _split_at_autograd_functions(gm: fx.GraphModule) -> tuple[fx.GraphModule, frozenset[str]] | None:
    """Cut `gm` before and after every custom autograd.Function call (each call with the getitems of its outputs
    gets a part of its own); None when it calls none. Returns the split module and the names of the parts
    holding no call."""
    part: dict[fx.Node, int] = {}
    function_parts: set[int] = set()
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if _is_autograd_function(node):
            current += 1
            part[node] = current
            function_parts.add(current)
            current += 1
        elif node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0] in part:
            source = part[node.args[0]]
            part[node] = source if source in function_parts else current
        else:
            part[node] = current
    if not function_parts:
        return None
    module = split_module(gm, gm, lambda node: part[node], keep_original_order=True)
    return module, frozenset(f"submod_{p}" for p in set(part.values()) - function_parts)


class _PartRetracer(fx.Interpreter):
    """Runs a split graph on fake inputs: retraces each part without an autograd.Function call to ATen as its
    inputs become known, and records the fake value of every node of the other parts."""

    def __init__(self, module: fx.GraphModule, segments: frozenset[str]) -> None:
        super().__init__(module)
        self.segments = segments
        self.parts: dict[str, fx.GraphModule] = {}
        self.values: dict[fx.Node, Any] = {}

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        part = self.fetch_attr(target)
        if target in self.segments:
            self.parts[target] = _retrace(part, args)
            return super().call_module(target, args, kwargs)
        inner = fx.Interpreter(part, garbage_collect_values=False)
        out = inner.run(*args)
        self.values.update(inner.env)
        return out


def _inline(split: fx.GraphModule, retracer: _PartRetracer, fakes: Sequence[Any]) -> fx.GraphModule:
    """One flat graph of the split graph's parts, in order: each part's graph copied in, with its attributes (the
    Function bodies, lifted constants) renamed per part, and every node's fake value in `meta["val"]`."""
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    inputs = iter(fakes)
    for node in split.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name, type_expr=node.type)
            env[node].meta["val"] = next(inputs)
        elif node.op == "call_module":
            part = retracer.parts.get(node.target) or split.get_submodule(node.target)
            assert isinstance(part, fx.GraphModule), "split_module makes every part a GraphModule"
            env[node] = _copy_part(graph, root, node.target, part, [env[a] for a in node.args], retracer.values)
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(env[node.args[0]], tuple):
            env[node] = env[node.args[0]][node.args[1]]  # an output of a part with several
        elif node.op == "output":
            graph.output(fx.map_arg(node.args[0], lambda n: env[n]))
        else:
            raise CaptureDeclined(f"unexpected {node.op} node {node.name} between the parts of a split graph")
    return fx.GraphModule(root, graph)


def _copy_part(
    graph: fx.Graph, root: torch.nn.Module, name: str, part: fx.GraphModule, args: list[Any], values: dict[fx.Node, Any]
) -> Any:
    placeholders = [n for n in part.graph.nodes if n.op == "placeholder"]
    val_map: dict[fx.Node, Any] = dict(zip(placeholders, args, strict=True))
    out = graph.graph_copy(part.graph, val_map)
    for old in part.graph.nodes:
        if old.op in ("placeholder", "output"):
            continue
        new = val_map[old]
        if old in values:  # a node of an autograd.Function part: its value in the retrace's fake mode
            new.meta["val"] = values[old]
        if old.op == "get_attr":
            new.target = f"{name}_{old.target}".replace(".", "_")
            setattr(root, new.target, operator.attrgetter(old.target)(part))
    return tuple(out) if isinstance(out, (list, tuple)) else out


def fakeify(fake_mode: FakeTensorMode, inputs: Sequence[Any]) -> list[Any]:
    return [fake_mode.from_tensor(x, static_shapes=False) if isinstance(x, torch.Tensor) else x for x in inputs]


def _retrace(gm: fx.GraphModule, fakes: Sequence[Any]) -> fx.GraphModule:
    _check_retraceable(gm)
    return make_fx(gm, tracing_mode="real", pre_dispatch=True, decomposition_table=FAST_PATH_DECOMPOSITIONS)(*fakes)


def dynamo_graph_to_aten(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Retrace a Dynamo graph (inputs flattened, parameters lifted) to pre-dispatch ATen with the same signature.

    Uses Dynamo's own fake mode so symbolic (dynamic) sizes survive. A custom autograd.Function call cannot be
    retraced (its forward would run under no_grad and its backward be lost), so the stretches between such calls
    are retraced one by one and joined back around the calls, which stay as Dynamo wrote them for AOTAutograd to
    differentiate: the passes see one graph, and the calls are opaque nodes in it.

    Calls of higher-order ops with a body (activation checkpointing, `invoke_subgraph`) stay calls, their bodies
    retraced to ATen too (compiler/hop_bodies.py), for the pipeline to rewrite inside them.
    """
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = fakeify(fake_mode, example_inputs)
    with retraceable_hops(gm):
        traced = _retrace_split(gm, fake_mode, fakes)
    drop_empty_context_fns(traced)
    return traced


def _retrace_split(gm: fx.GraphModule, fake_mode: FakeTensorMode, fakes: Sequence[Any]) -> fx.GraphModule:
    split = _split_at_autograd_functions(gm)
    with fake_mode:
        if split is None:
            return _retrace(gm, fakes)
        module, segments = split
        retracer = _PartRetracer(module, segments)
        retracer.run(*fakes)
    return _inline(module, retracer, fakes)


def capture(fn: Callable[..., Any] | torch.nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Trace `fn(*example_inputs)` to pre-dispatch ATen with static shapes; parameters become constants.

    For tests and offline analysis; the backend uses `dynamo_graph_to_aten` on Dynamo's graph instead.
    """
    if not callable(fn):
        raise TypeError(f"capture: fn must be a module or callable, got {type(fn).__name__}")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        return make_fx(fn, tracing_mode="real", pre_dispatch=True, decomposition_table=FAST_PATH_DECOMPOSITIONS)(*fakes)
