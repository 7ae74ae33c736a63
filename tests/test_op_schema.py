"""codegen/op_schema.py: the tilefuse:: ops' schemas come from their argument records unchanged, calls are built and
bound by name, and the records are a leaf the passes import without reaching kernels."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import tilefuse  # noqa: F401  (registers the ops)
from tilefuse.codegen.op_schema import (
    ALL_OPS,
    ATTENTION,
    NORM_BACKWARD,
    AttnFlags,
    AttnInputs,
    OpSignature,
    norm_op,
)
from tilefuse.specs import AttentionSpec, RopeSpec

ROOT = Path(__file__).resolve().parents[1]

# The schemas compiled graphs, saved tuning data and users of torch.ops.tilefuse.* rely on: a change here is a
# compatibility break, never a refactoring.
SCHEMAS = {
    "add_layer_norm": "tilefuse::add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, Scalar eps) "
    "-> (Tensor, Tensor)",
    "add_rms_norm": "tilefuse::add_rms_norm(Tensor x, Tensor residual, Tensor? weight, Scalar eps, float "
    "weight_offset, SymInt eps_mode=0, float norm_scale=1.) -> (Tensor, Tensor)",
    "attention": "tilefuse::attention(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? alibi_slopes, Tensor? cos, "
    "Tensor? sin, Scalar scale, bool causal, bool bottom_right, SymInt window, Scalar softcap, SymInt rope_layout, "
    "SymInt rotary_dim, float dropout_p=0., Tensor? rng=None, SymInt[]? out_order=None) -> (Tensor, Tensor)",
    "attention_backward": "tilefuse::attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? mask, "
    "Tensor? alibi_slopes, Tensor? cos, Tensor? sin, Tensor out, Tensor lse, Scalar scale, bool causal, bool "
    "bottom_right, SymInt window, Scalar softcap, SymInt rope_layout, SymInt rotary_dim, float dropout_p=0., Tensor? "
    "rng=None, bool[]? input_grads=None, Tensor? grad_lse=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor)",
    "layer_norm": "tilefuse::layer_norm(Tensor x, Tensor? weight, Tensor? bias, Scalar eps) -> Tensor",
    "norm_backward": "tilefuse::norm_backward(Tensor grad, Tensor x, Tensor? weight, Scalar eps, float weight_offset, "
    "bool rms, SymInt eps_mode=0, float norm_scale=1.) -> (Tensor, Tensor, Tensor)",
    "rms_norm": "tilefuse::rms_norm(Tensor x, Tensor? weight, Scalar eps, float weight_offset, SymInt eps_mode=0, "
    "float norm_scale=1.) -> Tensor",
    "rope": "tilefuse::rope(Tensor x, Tensor cos, Tensor sin, SymInt layout, SymInt rotary_dim, SymInt[]? "
    "out_order=None) -> Tensor",
    "rope_backward": "tilefuse::rope_backward(Tensor grad, Tensor cos, Tensor sin, SymInt layout, SymInt rotary_dim, "
    "ScalarType x_dtype) -> Tensor",
}


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: op.name)
def test_registered_schema_is_the_records_and_unchanged(op: OpSignature) -> None:
    assert str(op.overload._schema) == SCHEMAS[op.name]
    assert str(torch._C.parse_schema(op.qualname + op.schema())) == SCHEMAS[op.name]
    assert torch.Tag.pt2_compliant_tag in op.overload.tags


def test_every_tilefuse_op_has_a_record() -> None:
    assert {op.name for op in ALL_OPS} == set(SCHEMAS)


def test_call_args_fill_defaults_up_to_the_last_argument_given() -> None:
    q = torch.zeros(1, 1, 2, 4)
    args = ATTENTION.call_args(AttnInputs(q, q, q), AttnFlags(0.5, causal=True))
    assert len(args) == ATTENTION.names.index("rng") + 1 and args[-1] is None
    with_order = ATTENTION.call_args(AttnInputs(q, q, q), AttnFlags(0.5), out_order=[0, 2, 1, 3])
    assert with_order[-1] == [0, 2, 1, 3] and len(with_order) == len(ATTENTION.names)
    with pytest.raises(TypeError, match="bias"):
        ATTENTION.call_args(AttnInputs(q, q, q), AttnFlags(0.5), bias=q)


def test_bind_names_every_argument_with_defaults() -> None:
    q = torch.zeros(1, 1, 2, 4)
    call = ATTENTION.bind(ATTENTION.call_args(AttnInputs(q, q, q), AttnFlags(0.5)))
    assert tuple(call) == ATTENTION.names and call["out_order"] is None and call["dropout_p"] == 0.0
    backward = NORM_BACKWARD.bind((q, q, None, 1e-6, 0.0, True))
    assert (backward["rms"], backward["eps_mode"], backward["norm_scale"]) == (True, 0, 1.0)


def test_flags_from_spec_follow_the_spec() -> None:
    rope = RopeSpec("interleaved", 8, 16)
    spec = AttentionSpec(
        batch=1, q_heads=2, kv_heads=2, q_len=4, kv_len=4, head_dim=16, v_head_dim=16, dtype="float32", scale=0.25,
        causal=True, align="top_left", window=3, softcap=None, rope=rope,
    )  # fmt: skip
    assert AttnFlags.from_spec(spec) == AttnFlags(0.25, True, False, 3, 0.0, 1, 8, 0.0)
    assert AttnFlags.from_spec(spec, ("s", "c"))[:5] == ("s", True, False, 3, "c")


def test_norm_ops_take_the_fields_they_name() -> None:
    assert norm_op(rms=False, residual=True).names == ("x", "residual", "weight", "bias", "eps")
    assert norm_op(rms=True, residual=False).names[-3:] == ("weight_offset", "eps_mode", "norm_scale")


def _imports(path: Path) -> set[str]:
    """The absolute modules a file imports (relative imports resolved inside the tilefuse package)."""
    package = ("tilefuse", *path.relative_to(ROOT).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            found.add(".".join((*base, *([node.module] if node.module else []))))
    return found


def test_op_records_are_a_leaf() -> None:
    """The standard library, torch and tilefuse.specs only."""
    outside = {m for m in _imports(ROOT / "codegen" / "op_schema.py") if m.split(".")[0] not in sys.stdlib_module_names}
    assert outside <= {"torch", "tilefuse.specs"}


def test_passes_build_op_calls_without_reaching_kernels() -> None:
    """The passes take the op records from op_schema; of codegen they may read only the reference's dtype rule
    and the layout helpers, never the op registration, its CPU/GPU implementations or the kernels."""
    allowed = {"tilefuse.codegen.op_schema", "tilefuse.codegen.reference", "tilefuse.codegen.layouts"}
    for path in sorted((ROOT / "passes").glob("*.py")):
        codegen = {m for m in _imports(path) if m.startswith("tilefuse.codegen")}
        assert codegen <= allowed, (path.name, codegen - allowed)


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: op.name)
def test_positional_bind_matches_signature_bind(op: OpSignature) -> None:
    """`bind`'s positional fast path (it runs on every op call) gives what inspect.Signature.bind gives, for every
    prefix of arguments a call may pass, and the same errors."""
    params = list(op.signature.parameters.values())
    values = [object() for _ in params]  # distinct markers: a misplaced argument cannot go unnoticed
    for length in range(len(params) + 2):
        args = values[:length] + [object()] * (length - len(params))
        try:
            bound = op.signature.bind(*args)
        except TypeError as err:
            with pytest.raises(TypeError, match=str(err)):
                op.bind(args)
            continue
        bound.apply_defaults()
        assert op.bind(args) == dict(bound.arguments)
