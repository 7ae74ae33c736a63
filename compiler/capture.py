"""Capture: turn a Dynamo graph, a module or a function into a pre-dispatch ATen graph with fake metadata.

Pre-dispatch ATen (the level torch.export's training IR uses) sits before autograd, keeps composite ops such as
`matmul`, `softmax`, `linear`, `layer_norm` and `scaled_dot_product_attention` whole, and records a fake tensor in
every node's `meta["val"]`, so the passes can read shapes and dtypes without running anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv


class CaptureDeclined(Exception):
    """The graph cannot be retraced without changing what it computes; the caller compiles it unfused."""


def _check_retraceable(gm: fx.GraphModule) -> None:
    """Retracing runs a custom autograd.Function's forward under no_grad and loses its backward: refuse."""
    for node in gm.graph.nodes:
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator) and target.name() == "autograd_function_apply":
            raise CaptureDeclined(
                f"graph calls a custom autograd.Function ({node.name}) with grad enabled; retracing it would "
                "drop its backward, so this graph is left unfused (it fuses under torch.no_grad)"
            )


def _fakeify(fake_mode: FakeTensorMode, inputs: Sequence[Any]) -> list[Any]:
    return [fake_mode.from_tensor(x, static_shapes=False) if isinstance(x, torch.Tensor) else x for x in inputs]


def dynamo_graph_to_aten(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Retrace a Dynamo graph (inputs flattened, parameters lifted) to pre-dispatch ATen with the same signature.

    Uses Dynamo's own fake mode so symbolic (dynamic) sizes survive. Raises CaptureDeclined for graphs whose
    meaning retracing would change.
    """
    _check_retraceable(gm)
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = _fakeify(fake_mode, example_inputs)
    with fake_mode:
        return make_fx(gm, tracing_mode="real", pre_dispatch=True)(*fakes)


def capture(fn: Callable[..., Any] | torch.nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Trace `fn(*example_inputs)` to pre-dispatch ATen with static shapes; parameters become constants.

    For tests and offline analysis; the backend uses `dynamo_graph_to_aten` on Dynamo's graph instead.
    """
    if not callable(fn):
        raise TypeError(f"capture: fn must be a module or callable, got {type(fn).__name__}")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        return make_fx(fn, tracing_mode="real", pre_dispatch=True)(*fakes)
