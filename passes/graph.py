"""Graph helpers shared by the recognizers: op tests, metadata access, constants, regions and node insertion."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .buffer_masks import MODULE_VALUE

aten = torch.ops.aten


def is_op(node: Any, *packets: Any) -> bool:
    """True when `node` calls one of `packets` (an OpOverloadPacket like aten.add, or an exact overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return any(target is p or packet is p for p in packets)


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def tensor_val(node: Any) -> torch.Tensor | None:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def static_dim(d: Any) -> int | None:
    """An int for a static size, None for a symbolic one."""
    if isinstance(d, int):
        return d
    try:
        return int(d) if not isinstance(d, torch.SymInt) or d.node.is_constant() else None
    except Exception:
        return None


def static_shape(node: fx.Node) -> tuple[int | None, ...]:
    t = tensor_val(node)
    return tuple(static_dim(d) for d in t.shape) if t is not None else ()


def ndim(node: Any) -> int:
    t = tensor_val(node)
    return t.dim() if t is not None else -1


def dtype_of(node: Any) -> torch.dtype | None:
    t = tensor_val(node)
    return t.dtype if t is not None else None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def scalar_value(x: Any) -> float | None:
    """The Python number `x` stands for: a literal, or a node building a 0-d constant (full, scalar_tensor, or a
    0-d tensor literal `torch.tensor(c)`, traced as `lift_fresh_copy` of a `_tensor_constant` attribute).

    Only 0-d constants count: a multiplicative scale of larger shape would broadcast the result, so callers that
    accept any constant-filled tensor (a `where` fill) use `constant_fill` / `scalar_operand` instead.
    """
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    literal = literal_tensor(x)
    if literal is not None:
        return _number(literal) if literal.dim() == 0 else None
    if is_op(x, aten.full) and len(x.args[0]) == 0:
        return scalar_value(x.args[1])
    if is_op(x, aten.zeros, aten.ones) and len(x.args[0]) == 0:
        return 0.0 if is_op(x, aten.zeros) else 1.0
    if is_op(x, aten.scalar_tensor):
        return scalar_value(x.args[0])
    if is_op(x, aten.to, aten._to_copy, aten.clone, aten.detach, aten.detach_, aten.lift_fresh_copy, aten.alias):
        return scalar_value(x.args[0])
    if is_op(x, aten.sqrt):
        inner = scalar_value(x.args[0])
        return math.sqrt(inner) if inner is not None and inner >= 0 else None
    return None


def literal_tensor(node: Any) -> torch.Tensor | None:
    """The value of a tensor literal written in the program (`torch.tensor(c)`), which tracing records as
    `lift_fresh_copy` of a constant attribute: a fresh copy per call, so its value is fixed. A bare `get_attr`
    is module state (a buffer, or a parameter under `capture`) that may change between calls: None."""
    if not is_op(node, aten.lift_fresh_copy) or is_mutated(node):
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or source.op != "get_attr" or source.graph.owning_module is None:
        return None
    obj: Any = source.graph.owning_module
    for part in str(source.target).split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, torch.Tensor) or is_fake(obj) or obj.requires_grad:
        return None
    return obj


def _number(t: torch.Tensor) -> float | None:
    """The value of a one-element real tensor (bool and complex excluded)."""
    if t.numel() != 1 or t.dtype == torch.bool or t.is_complex():
        return None
    return float(t.item())


# Composite ops whose schema promises a new tensor but which hand back their input in some cases (eval-mode
# dropout, `type_as` to the same dtype, `sum_to_size` to the same size, `atleast_*d` of a big enough tensor).
_MAY_RETURN_INPUT = frozenset(
    {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "type_as", "sum_to_size"}
    | {"atleast_1d", "atleast_2d", "atleast_3d"}
)


def returns_alias(node: fx.Node) -> bool:
    """True when `node`'s result may share storage with an input (views, in-place ops, unknown callables)."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return node.op != "output"
    return _may_return_input(node) or any(r.alias_info for r in node.target._schema.returns)


def _may_return_input(node: fx.Node) -> bool:
    if is_op(node, aten.einsum):
        return len(_einsum_operands(node)) == 1  # one operand: a permuted or diagonal view of it
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.name.removeprefix("aten::") in _MAY_RETURN_INPUT


def _einsum_operands(node: fx.Node) -> tuple[Any, ...]:
    operands = arg(node, 1, "tensors", ())
    return tuple(operands) if isinstance(operands, (list, tuple)) else ()


# In-place ops that change a tensor's autograd flag or shape, never an element of its storage.
_METADATA_ONLY = frozenset({"detach_", "squeeze_", "unsqueeze_", "transpose_", "t_", "swapdims_", "swapaxes_"})


def writes(node: fx.Node, tensor: fx.Node) -> bool:
    """True when `node` mutates `tensor` (its schema marks that argument `Tensor(a!)`); unknown callables may."""
    if node.op == "output":
        return False
    if not isinstance(node.target, torch._ops.OpOverload):
        return True
    if node.target._schema.name.removeprefix("aten::") in _METADATA_ONLY:
        return False
    for i, schema_arg in enumerate(node.target._schema.arguments):
        if schema_arg.alias_info is None or not schema_arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(schema_arg.name)
        if value is tensor or (isinstance(value, (list, tuple)) and tensor in value):
            return True
    return False


def aliases_of(node: fx.Node) -> set[fx.Node]:
    """`node` and every node that may share its storage through a chain of views or in-place results."""
    found, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in found and returns_alias(user):
                found.add(user)
                stack.append(user)
    return found


def storage_root(node: fx.Node) -> fx.Node:
    """The node whose storage `node` shares: up through views and in-place results to the op that made it."""
    while node.op == "call_function" and returns_alias(node):
        source = _aliased_input(node)
        if source is None:
            return node
        node = source
    return node


def _aliased_input(node: fx.Node) -> fx.Node | None:
    """The argument a view or in-place result aliases (its schema shares an alias set with the return)."""
    first = _einsum_operands(node)[0] if is_op(node, aten.einsum) else node.args[0] if node.args else None
    schema = getattr(node.target, "_schema", None)
    if schema is None or _may_return_input(node):
        return first if isinstance(first, fx.Node) else None
    returned = {s for r in schema.returns if r.alias_info is not None for s in r.alias_info.before_set}
    for i, schema_arg in enumerate(schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(schema_arg.name)
        if schema_arg.alias_info is not None and returned & set(schema_arg.alias_info.before_set):
            return value if isinstance(value, fx.Node) else None
    return None


def writers_of(node: fx.Node) -> set[fx.Node]:
    """Every op of the graph that writes the storage `node` shares with its base and the base's aliases."""
    return {user for alias in aliases_of(storage_root(node)) for user in alias.users if writes(user, alias)}


def is_mutated(node: fx.Node) -> bool:
    """True when some op of the graph writes the storage `node` shares with its base and the base's aliases."""
    return bool(writers_of(node))


# Ops each of whose output elements is an element of their first input (converted to the output dtype).
_SAME_VALUES = (
    aten.to,
    aten._to_copy,
    aten.type_as,
    aten.clone,
    aten.contiguous,
    aten.detach,
    aten.detach_,
    aten.alias,
    aten.lift_fresh_copy,
    aten.expand,
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.unsqueeze,
    aten.squeeze,
    aten.permute,
    aten.transpose,
    aten.t,
    # a selection of elements (in range, or the op raises) of a tensor holding one value holds that value
    aten.index,
    aten.index_select,
    aten.select,
    aten.slice,
    aten.gather,
)
_FILL_ARG = {aten.full: 1, aten.full_like: 1, aten.new_full: 2, aten.scalar_tensor: 0}


def constant_fill(x: Any) -> float | None:
    """The value every element of `x` holds, exactly as stored in its dtype, when `x` is a number or a
    constant-filled tensor of any shape (`full`, `full_like`, `new_full`, `zeros`/`ones`(`_like`), a one-element
    tensor literal), possibly cast or viewed; None otherwise (including when anything writes it)."""
    if not isinstance(x, fx.Node):
        return float(x) if isinstance(x, (bool, int, float)) else None
    if is_mutated(x):
        return None
    return stored(_fill_source_value(x), dtype_of(x))


def _fill_source_value(x: fx.Node) -> float | None:
    literal = literal_tensor(x)
    if literal is not None:
        return _number(literal)
    for packet, index in _FILL_ARG.items():
        if is_op(x, packet):
            return constant_fill(arg(x, index, "fill_value")) if len(x.args) > index else None
    if is_op(x, aten.zeros, aten.zeros_like, aten.new_zeros, aten.ones, aten.ones_like, aten.new_ones):
        return 0.0 if is_op(x, aten.zeros, aten.zeros_like, aten.new_zeros) else 1.0
    return constant_fill(x.args[0]) if is_op(x, *_SAME_VALUES) else None


def stored(value: float | None, dtype: torch.dtype | None) -> float | None:
    """`value` converted to `dtype` the way filling a tensor of that dtype converts it; None when unsure."""
    if value is None or dtype is None or dtype.is_complex:
        return None
    if dtype == torch.bool:
        return float(value != 0)
    if dtype.is_floating_point:
        return float(torch.tensor(value, dtype=torch.float64).to(dtype).item())
    return value if math.isfinite(value) and value.is_integer() else None


def scalar_operand(x: Any, other: Any) -> float | None:
    """`constant_fill(x)` when `x`, as an elementwise partner of `other`, changes neither its shape nor its dtype,
    so `x` acts like the Python number (a scale or fill of larger shape or wider dtype would not)."""
    value = constant_fill(x)
    xv, ov = tensor_val(x), tensor_val(other)
    if value is None or not isinstance(x, fx.Node):
        return value
    if xv is None or ov is None or not _broadcasts_into(xv.shape, ov.shape):
        return None
    return value if torch.result_type(_dtype_probe(xv), _dtype_probe(ov)) == ov.dtype else None


def _broadcasts_into(shape: Sequence[Any], target: Sequence[Any]) -> bool:
    if len(shape) > len(target):
        return False
    pairs = zip(reversed(list(shape)), reversed(list(target)), strict=False)
    return all(statically_known_true(s == 1) or statically_known_true(s == t) for s, t in pairs)


def _dtype_probe(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with `t`'s dtype and 0-d-ness: all that type promotion looks at."""
    return torch.empty((1,) * min(t.dim(), 1), dtype=t.dtype, device="meta")


def same_layout(a: Any, b: Any) -> bool:
    """True when two fake values provably agree in shape, dtype, device and strides (size-1 dims' strides aside)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    if not all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape, strict=True)):
        return False
    strides = zip(a.shape, a.stride(), b.stride(), strict=True)
    return all(statically_known_true(size == 1) or statically_known_true(x == y) for size, x, y in strides)


def insert_equivalent(
    before: fx.Node, target: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any] | None = None
) -> fx.Node | None:
    """Insert `target(*args, **kwargs)` before `before` when its fake value has `before`'s layout, else nothing.

    For rewrites that must not change what later ops see: a different shape, dtype or stride declines.
    """
    value = _fake_call(before.graph, target, tuple(args), kwargs or {})
    if not same_layout(value, before.meta.get("val")):
        return None
    with before.graph.inserting_before(before):
        node = before.graph.call_function(target, tuple(args), kwargs or {})
    node.meta["val"] = value
    return node


def _fake_call(graph: fx.Graph, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`target` run on the arguments' fake values; None when there is no fake mode or the kernel rejects them."""
    fake_mode = fake_mode_of(graph)
    if fake_mode is None:
        return None
    fake_args, fake_kwargs = _fake_inputs(args, kwargs)
    try:
        with fake_mode:
            return target(*fake_args, **fake_kwargs)
    except Exception:  # e.g. a dtype or shape the op does not accept: the rewrite does not apply
        return None


def _fake_inputs(args: Any, kwargs: Any) -> tuple[Any, Any]:
    """Arguments with every node replaced by its fake value (`meta["val"]`)."""
    return fx.node.map_arg(args, lambda n: n.meta.get("val")), fx.node.map_arg(kwargs, lambda n: n.meta.get("val"))


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def region_between(graph: fx.Graph, inputs: Iterable[fx.Node], output: fx.Node) -> set[fx.Node]:
    """Nodes on some path from one of `inputs` to `output`, inputs excluded, output included.

    Only the ancestors of `output` up to `inputs` are visited, so the cost is local to the site.
    """
    stop = set(inputs)
    local: nx.DiGraph = nx.DiGraph()
    stack, seen = [output], {output}
    while stack:
        node = stack.pop()
        local.add_node(node)
        if node in stop:
            continue
        for parent in node.all_input_nodes:
            local.add_edge(parent, node)
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    region: set[fx.Node] = set()
    for node in stop & set(local.nodes):
        region |= nx.descendants(local, node)
    return region - stop


def escaping_nodes(region: set[fx.Node], output: fx.Node) -> list[fx.Node]:
    """Region nodes other than `output` whose value is used outside the region."""
    return [n for n in region if n is not output and any(u not in region for u in n.users)]


def fake_mode_of(graph: fx.Graph) -> FakeTensorMode | None:
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def insert_call(
    graph: fx.Graph, target: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any] | None = None
) -> fx.Node:
    """Insert `target(*args)` at the current insertion point and fill its `val` metadata by fake propagation."""
    node = graph.call_function(target, tuple(args), kwargs or {})
    fake_mode = fake_mode_of(graph)
    fake_args, fake_kwargs = _fake_inputs(node.args, node.kwargs)
    if fake_mode is not None:
        with fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def getitem(graph: fx.Graph, node: fx.Node, index: int) -> fx.Node:
    import operator

    item = graph.call_function(operator.getitem, (node, index))
    item.meta["val"] = node.meta["val"][index] if "val" in node.meta else None
    return item


def replace_with(old: fx.Node, new: fx.Node) -> None:
    """Replace all uses of `old` by `new`, inserting a dtype cast when the dtypes differ."""
    old_dtype, new_dtype = dtype_of(old), dtype_of(new)
    if old_dtype is not None and new_dtype is not None and old_dtype != new_dtype:
        with old.graph.inserting_after(new):
            new = insert_call(old.graph, aten._to_copy.default, (new,), {"dtype": old_dtype})
    old.replace_all_uses_with(new)


def may_require_grad(node: fx.Node, budget: int = 512) -> bool:
    """Whether a gradient can reach `node`: a floating-point tensor computed through floating-point tensors from a
    graph input or a module attribute that requires grad. The retraced graph's values do not record requires_grad
    (and under torch.compile parameters are inputs), so every floating-point input counts; integer and boolean
    tensors and constant fills (`zeros_like(x)`, ...) carry no gradient."""
    pending, seen = [node], {node}
    while pending:
        current = pending.pop()
        val = tensor_val(current)
        if val is None or not val.is_floating_point() or constant_fill(current) is not None:
            continue
        if current.op == "placeholder" and not _state_without_grad(current):
            return True
        if current.op == "get_attr" and _attribute_requires_grad(current):
            return True
        fresh = [n for n in current.all_input_nodes if n not in seen]
        seen.update(fresh)
        pending.extend(fresh)
        if len(seen) > budget:
            return True  # too far to look: assume it can
    return False


def _state_without_grad(node: fx.Node) -> bool:
    """A module buffer whose real value the backend attached (buffer_masks.mark_module_values) and that does not
    require grad; Dynamo guards the input's requires_grad, so no gradient can reach it in this graph."""
    value = node.meta.get(MODULE_VALUE)
    return isinstance(value, torch.Tensor) and not value.requires_grad


def _attribute_requires_grad(node: fx.Node) -> bool:
    obj: Any = node.graph.owning_module
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, torch.Tensor) and obj.requires_grad
