"""CanonicalizePass: each rewrite fires where it is exact (and the rewritten graph computes the same bits), and
leaves the graph alone where it is not: in-place ops on inputs or read through an older alias, an empty buffer
written through overlapping views or read before it is whole, einsums that are not batched matmuls, constant
fills that would change a result's shape or dtype."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
from _helpers import ops_in, run_pass
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tilefuse.compiler.capture import capture
from tilefuse.passes.base import PassContext
from tilefuse.passes.canonicalize import CanonicalizePass
from tilefuse.passes.canonicalize_einsum import matmul_form
from tilefuse.passes.canonicalize_inplace import functional_variant
from tilefuse.passes.graph import aten, constant_fill, scalar_operand, scalar_value

NEG_INF = float("-inf")
IN_PLACE = {"aten.add_", "aten.mul_", "aten.div_", "aten.masked_fill_", "aten.zero_", "aten.detach_"}


def canonicalize(fn: Callable[..., Any], inputs: tuple[Any, ...]) -> tuple[fx.GraphModule, PassContext]:
    return run_pass(CanonicalizePass(), fn, inputs)


def assert_same_bits(gm: fx.GraphModule, fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> None:
    """The canonical graph returns exactly the module's values (inputs cloned: some programs mutate them)."""
    expected, actual = fn(*(x.clone() for x in inputs)), gm(*(x.clone() for x in inputs))
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(bits(a), bits(e))


def bits(t: Tensor) -> Tensor:
    """The stored bits of a float tensor (so -0 differs from 0, and NaNs compare equal to themselves)."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def node_of(gm: fx.GraphModule, packet: Any) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.overloadpacket is packet]
    return node


# ------------------------------------------------------------------------------------------------ in-place ops
@pytest.mark.parametrize(
    ("in_place", "functional"),
    [
        (aten.div_.Tensor, aten.div.Tensor),
        (aten.masked_fill_.Scalar, aten.masked_fill.Scalar),
        (aten.add_.Tensor, aten.add.Tensor),
        (aten.copy_.default, aten.copy.default),
        (aten.__iand__.Tensor, aten.__and__.Tensor),
        (aten.set_.source_Tensor, None),  # swaps the storage
        (aten.bernoulli_.float, None),  # random
        (aten.add.Tensor, None),  # not in place
        (aten.view.default, None),
    ],
)
def test_functional_variant(in_place: Any, functional: Any) -> None:
    assert functional_variant(in_place) is functional


def scores_in_place(x: Tensor, y: Tensor, keep: Tensor) -> Tensor:
    s = x @ y
    s /= 4.0
    s.masked_fill_(~keep, NEG_INF)
    s.add_(1.0)
    return s.softmax(-1)


def alias_read_before(x: Tensor) -> tuple[Tensor, Tensor]:
    s = x + 1.0
    early = s.view(-1).sum()  # the view is read before the mutation only
    s.mul_(2.0)
    return s, early


def view_made_after(x: Tensor) -> Tensor:
    s = x + 1.0
    s.mul_(2.0)
    return s.transpose(0, 1) * 3.0


def chained_on_result(x: Tensor) -> Tensor:
    return (x * 2.0).add_(1.0).mul_(3.0)


@pytest.mark.parametrize(("fn", "count"), [(alias_read_before, 1), (view_made_after, 1), (chained_on_result, 2)])
def test_in_place_on_an_intermediate_becomes_functional(fn: Callable[..., Any], count: int) -> None:
    inputs = (randn(4, 6),)
    gm, ctx = canonicalize(fn, inputs)
    assert ctx.counters["canonicalize_functionalized"] == count
    assert not ops_in(gm) & IN_PLACE, gm.code
    assert_same_bits(gm, fn, inputs)


def test_in_place_score_chain_becomes_functional() -> None:
    inputs = (randn(2, 5, 8), randn(2, 8, 7, seed=1), torch.rand(5, 7, generator=torch.Generator()) > 0.3)
    gm, ctx = canonicalize(scores_in_place, inputs)
    assert ctx.counters["canonicalize_functionalized"] == 3
    assert {"aten.div", "aten.masked_fill", "aten.add"} <= ops_in(gm) and not ops_in(gm) & IN_PLACE
    assert "torch.ops.aten.masked_fill.Scalar(" in gm.code and "aten.masked_fill_." not in gm.code
    assert_same_bits(gm, scores_in_place, inputs)


def input_mutated(x: Tensor) -> Tensor:
    x.mul_(2.0)
    return x + 1.0


def alias_read_after(x: Tensor) -> Tensor:
    s = x + 1.0
    row = s[0]  # made before the mutation, read after it: sees the new values
    s.mul_(2.0)
    return row + 1.0


def transposed_alias_returned(x: Tensor) -> tuple[Tensor, Tensor]:
    s = x + 1.0
    t = s.transpose(0, 1)
    s.add_(1.0)
    return s, t


def view_mutated(x: Tensor) -> Tensor:
    s = x + 1.0
    s[0].zero_()  # in place on a view: the base changes too
    return s * 2.0


def widening_in_place(x: Tensor, y: Tensor) -> Tensor:
    s = x.to(torch.bfloat16) * 1.5
    s.mul_(y)  # bf16 *= fp32 stays bf16; the functional mul would give fp32
    return s


def overlapping_writes(x: Tensor) -> Tensor:
    out = torch.empty_like(x)
    out[:, 0:4] = x[:, :4] * 2.0
    out[:, 3:6] = x[:, 3:] + 1.0  # column 3 written twice: no cat of the two holds that
    return out * 1.5


def read_between_writes(x: Tensor) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(x)
    out[:, 0::2] = x[:, 1::2]
    first = out[:, 0::2] * 1.0  # reads the buffer before it is whole
    out[:, 1::2] = x[:, 0::2]
    return out, first


def source_mutated_between_writes(x: Tensor) -> Tensor:
    out = torch.empty_like(x)
    out[:, 0::2] = x[:, 0::2]  # the values x holds now, not after the add_ below
    x.add_(1.0)
    out[:, 1::2] = x[:, 1::2]
    return out


def through_eval_dropout(x: Tensor) -> Tensor:
    s = x + 1.0
    p = torch.nn.functional.dropout(s, 0.1, training=False)  # returns s itself, though its schema says new
    p.mul_(2.0)
    return s * 1.5


def through_type_as(x: Tensor) -> Tensor:
    s = x + 1.0
    s.type_as(x).add_(1.0)  # the same dtype: type_as returns s itself
    return s * 1.5


@pytest.mark.parametrize(
    ("fn", "survivor"),
    [
        (through_eval_dropout, "aten.mul_"),
        (through_type_as, "aten.add_"),
        (input_mutated, "aten.mul_"),
        (alias_read_after, "aten.mul_"),
        (transposed_alias_returned, "aten.add_"),
        (view_mutated, "aten.zero_"),
        (widening_in_place, "aten.mul_"),
        (overlapping_writes, "aten.copy_"),
        (read_between_writes, "aten.copy_"),
        (source_mutated_between_writes, "aten.copy_"),
    ],
)
def test_unsafe_in_place_is_left_alone(fn: Callable[..., Any], survivor: str) -> None:
    inputs = (randn(4, 6), randn(4, 6, seed=1))[: fn.__code__.co_argcount]
    gm, ctx = canonicalize(fn, inputs)
    assert not ctx.counters["canonicalize_functionalized"]
    assert survivor in ops_in(gm), gm.code
    assert_same_bits(gm, fn, inputs)


class Program(nn.Module):
    """A fresh tensor, in-place ops on it, aliases of it and reads of both, in a generated order."""

    def __init__(self, steps: list[str]) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, x: Tensor, keep: Tensor) -> tuple[Tensor, ...]:
        s, aliases, reads = x * 1.0, [], []
        for step in self.steps:
            if step == "add_":
                s.add_(0.5)
            elif step == "mul_":
                s.mul_(-1.5)
            elif step == "masked_fill_":
                s.masked_fill_(~keep, -2.0)
            elif step == "view":
                aliases.append(s.view(-1))
            elif step == "transpose":
                aliases.append(s.transpose(0, 1))
            elif step == "read_alias" and aliases:
                reads.append(aliases[-1] * 1.0)
            elif step == "read":
                reads.append(s + 0.0)
        return (s, *reads)


STEPS = st.sampled_from(["add_", "mul_", "masked_fill_", "view", "transpose", "read_alias", "read"])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(steps=st.lists(STEPS, min_size=1, max_size=8))
def test_generated_in_place_programs_keep_their_values(steps: list[str]) -> None:
    program = Program(steps)
    inputs = (randn(3, 5), torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.5)
    gm, _ = canonicalize(program, inputs)
    assert_same_bits(gm, program, inputs)
    if not {"view", "transpose"} & set(steps):
        assert not ops_in(gm) & IN_PLACE, gm.code


# ------------------------------------------------------------------------------------------------------ einsum
@pytest.mark.parametrize(
    ("equation", "rank", "transposed"),
    [
        ("bhqd,bhkd->bhqk", 4, True),
        ("bhqk,bhkd->bhqd", 4, False),
        ("bqd,bkd->bqk", 3, True),
        ("...qd,...kd->...qk", 4, True),
        ("ZNIJ,ZNJK->ZNIK", 4, False),
        (" b h i d , b h j d -> b h i j ", 4, True),
        ("bhqd,bhkd->bhkq", 4, None),  # the output transposed
        ("bhqd,bhkd->bhq", 4, None),  # a reduction
        ("bhqd,bhkd", 4, None),  # implicit output
        ("bhqd,bhqd->bhq", 4, None),
        ("bhqd,hbkd->bhqk", 4, None),  # batch dims in another order
        ("bhqq,bhqd->bhqd", 4, None),  # a diagonal
        ("bhdq,bhkd->bhqk", 4, None),  # the first operand transposed
        ("bhkd,bhqk->bhqd", 4, None),  # the operands swapped
        ("b...qd,b...kd->b...qk", 5, None),  # an ellipsis not in front
        ("bhqd,bhkd,bhke->bhqe", 4, None),
    ],
)
def test_matmul_form(equation: str, rank: int, transposed: bool | None) -> None:
    """The einsums that already are `[*batch, m, c] @ [*batch, c, n]` (or `[*batch, n, c]`, transposed)."""
    form = matmul_form(equation, (rank, rank))
    assert (form.transposed if form is not None else None) == transposed
    if form is not None:
        assert form.out == (*form.batch, form.m, form.n) and not form.swapped


def einsum_of(equation: str) -> Callable[[Tensor, Tensor], Tensor]:
    def fn(a: Tensor, b: Tensor) -> Tensor:
        return torch.einsum(equation, a, b)

    return fn


EINSUM_CASES = [
    ("bhqd,bhkd->bhqk", (2, 4, 17, 40), (2, 4, 5, 40)),
    ("bhqk,bhkd->bhqd", (2, 4, 17, 5), (2, 4, 5, 59)),
    ("bhqd,bhkd->bhqk", (2, 4, 1, 16), (2, 4, 17, 16)),  # one query (decode)
    ("bhqk,bhkd->bhqd", (2, 4, 1, 17), (2, 4, 17, 16)),
    ("bqd,bkd->bqk", (8, 17, 111), (8, 113, 111)),
    ("bqk,bkd->bqd", (8, 17, 113), (8, 113, 40)),
    ("...qd,...kd->...qk", (2, 3, 17, 16), (2, 3, 9, 16)),
    ("xyij,xyjk->xyik", (1, 1, 3, 2), (1, 1, 2, 3)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("equation", "a_shape", "b_shape"), EINSUM_CASES)
def test_matmul_einsum_becomes_matmul_with_the_same_bits(
    equation: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    fn, inputs = einsum_of(equation), (randn(*a_shape, dtype=dtype), randn(*b_shape, seed=1, dtype=dtype))
    gm, ctx = canonicalize(fn, inputs)
    assert ctx.counters["canonicalize_einsum"] == 1
    assert "aten.einsum" not in ops_in(gm) and "aten.matmul" in ops_in(gm)
    form = matmul_form(equation, (len(a_shape), len(b_shape)))
    assert form is not None and ("aten.transpose" in ops_in(gm)) == form.transposed
    assert_same_bits(gm, fn, inputs)


def test_einsum_of_a_non_contiguous_operand_keeps_its_bits() -> None:
    def fn(a: Tensor, b: Tensor) -> Tensor:
        return torch.einsum("bhqd,bhkd->bhqk", a.transpose(1, 2), b)

    inputs = (randn(2, 17, 4, 40), randn(2, 4, 9, 40, seed=1))
    gm, ctx = canonicalize(fn, inputs)
    assert ctx.counters["canonicalize_einsum"] == 1
    assert_same_bits(gm, fn, inputs)


@pytest.mark.parametrize(
    ("equation", "a_shape", "b_shape"),
    [
        ("bhqd,bhkd->bhkq", (2, 4, 5, 8), (2, 4, 6, 8)),  # not a matmul layout
        ("bhqd,bhkd->bhq", (2, 4, 5, 8), (2, 4, 6, 8)),
        ("qd,kd->qk", (5, 8), (6, 8)),  # no batch dim: einsum runs bmm where matmul runs mm
        ("bhqd,bhkd->bhqk", (2, 4, 5, 8), (2, 1, 6, 8)),  # a broadcast head dim folds differently
        ("bhqd,bhkd->bhqk", (2, 4, 5, 8), (2, 4, 1, 8)),  # one key, transposed: other strides
        ("bhqd,bhdk->bhqk", (2, 4, 5, 1), (2, 4, 1, 6)),  # nothing to contract: einsum multiplies
    ],
)
def test_other_einsums_stay(equation: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    fn, inputs = einsum_of(equation), (randn(*a_shape), randn(*b_shape, seed=1))
    gm, ctx = canonicalize(fn, inputs)
    assert not ctx.counters["canonicalize_einsum"] and "aten.einsum" in ops_in(gm)
    assert "aten.matmul" not in ops_in(gm) and "aten.transpose" not in ops_in(gm)
    assert_same_bits(gm, fn, inputs)


# --------------------------------------------------------------------------------------------------- constants
class BufferScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(4.0))

    def forward(self, x: Tensor) -> Tensor:
        return x / self.scale


def test_scalar_value_reads_tensor_literals_but_not_module_state() -> None:
    x = randn(3, 4)
    literal = capture(lambda x: x / torch.tensor(4.0), (x,))
    assert scalar_value(node_of(literal, aten.div).args[1]) == 4.0
    vector = capture(lambda x: x / torch.tensor([4.0]), (x,))
    assert scalar_value(node_of(vector, aten.div).args[1]) is None  # not 0-d: a scale of [1] broadcasts a 0-d x
    assert constant_fill(node_of(vector, aten.div).args[1]) == 4.0
    buffer = capture(BufferScale(), (x,))
    assert scalar_value(node_of(buffer, aten.div).args[1]) is None  # a buffer may change between calls


def fills(x: Tensor) -> tuple[Tensor, ...]:
    return (
        x * torch.full_like(x, NEG_INF),
        x * x.new_full((3, 4), 2.5),
        x * torch.full(x.shape, 0.1).to(torch.bfloat16),
        x * torch.zeros_like(x),
        x * torch.ones(1, 4, dtype=torch.float64),
        x * torch.full((2, 3, 4), 3.0),
    )


def test_constant_fill_and_scalar_operand() -> None:
    x = randn(3, 4)
    gm = capture(fills, (x,))
    muls = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    values = [constant_fill(m.args[1]) for m in muls]
    bf16_tenth = torch.tensor(0.1, dtype=torch.bfloat16).item()
    assert values == [NEG_INF, 2.5, bf16_tenth, 0.0, 1.0, 3.0]  # as stored: 0.1 rounded to bf16
    operands = [scalar_operand(m.args[1], m.args[0]) for m in muls]
    # bf16 times fp32 and fp64 tensors promotes x's dtype; [2, 3, 4] broadcasts x's shape
    assert operands == [NEG_INF, 2.5, bf16_tenth, 0.0, None, None]


def test_a_mutated_fill_is_not_a_constant() -> None:
    def fn(s: Tensor, keep: Tensor) -> Tensor:
        fill = torch.full_like(s, NEG_INF)
        fill[0] = 1.0
        return torch.where(keep, s, fill)

    inputs = (randn(3, 4), torch.rand(3, 4, generator=torch.Generator()) > 0.5)
    gm, ctx = canonicalize(fn, inputs)
    assert not ctx.counters["canonicalize_where_fill"] and "aten.full_like" in ops_in(gm)
    assert_same_bits(gm, fn, inputs)


def where_fills(s: Tensor, keep: Tensor) -> tuple[Tensor, ...]:
    return (
        torch.where(keep, s, torch.full_like(s, NEG_INF)),
        torch.where(keep, torch.full_like(s, 0.0), s),
        torch.where(keep, s, torch.tensor(NEG_INF)),
        torch.where(keep, s, s.new_full(s.shape, -1e4)),
        torch.where(keep, s, torch.full(s.shape, float(torch.finfo(torch.float32).min))),
    )


def test_where_with_a_constant_branch_takes_the_scalar() -> None:
    inputs = (randn(2, 3, 4), torch.rand(3, 4, generator=torch.Generator()) > 0.5)
    gm, ctx = canonicalize(where_fills, inputs)
    assert ctx.counters["canonicalize_where_fill"] == 5
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target.overloadpacket is aten.where]
    assert targets == [aten.where.ScalarOther, aten.where.ScalarSelf, *[aten.where.ScalarOther] * 3]
    assert not ops_in(gm) & {"aten.full_like", "aten.full", "aten.new_full", "aten.lift_fresh_copy"}
    assert_same_bits(gm, where_fills, inputs)


def where_fills_that_change_the_result(s: Tensor, keep: Tensor) -> tuple[Tensor, ...]:
    return (
        torch.where(keep, s, torch.full((2, 2, 3, 4), NEG_INF)),  # broadcasts s to a larger shape
        torch.where(keep, s, torch.full_like(s, NEG_INF, dtype=torch.float64)),  # promotes to fp64
        torch.where(keep, s.to(torch.bfloat16), torch.full_like(s, 0.1)),  # promotes to fp32
    )


def test_where_fill_that_changes_shape_or_dtype_stays() -> None:
    inputs = (randn(2, 3, 4), torch.rand(3, 4, generator=torch.Generator()) > 0.5)
    gm, ctx = canonicalize(where_fills_that_change_the_result, inputs)
    assert not ctx.counters["canonicalize_where_fill"]
    assert_same_bits(gm, where_fills_that_change_the_result, inputs)


# ------------------------------------------------------------------------------------- softmax max-subtraction
def test_max_subtraction_is_kept_because_it_is_not_exact() -> None:
    """softmax(s - amax(s)) equals softmax(s) bitwise in fp32 forward, but not in bf16 (the shift is rounded to
    bf16) nor in the gradient (the amax branch adds a tiny nonzero term): not an identity canonicalize may use."""

    def fn(s: Tensor) -> Tensor:
        return (s - s.amax(-1, keepdim=True)).softmax(-1)

    s = randn(4, 33, seed=3) * 8
    gm, _ = canonicalize(fn, (s,))
    assert {"aten.amax", "aten.sub"} <= ops_in(gm)
    assert torch.equal(fn(s), s.softmax(-1))
    assert not torch.equal(fn(s.bfloat16()), s.bfloat16().softmax(-1))
    leaf = s.clone().requires_grad_()
    grad = torch.randn(4, 33, generator=torch.Generator().manual_seed(4))
    (shifted,) = torch.autograd.grad(fn(leaf), leaf, grad)
    (plain,) = torch.autograd.grad(leaf.softmax(-1), leaf, grad)
    assert not torch.equal(shifted, plain)


def test_alias_ops_take_their_short_names() -> None:
    """einx and others call `torch.subtract`, `torch.greater`, ...: recognizers see `sub`, `gt` instead."""

    def fn(x: Tensor, y: Tensor) -> Tensor:
        return torch.where(torch.greater(x, y), torch.subtract(x, y, alpha=2), torch.multiply(torch.negative(x), y))

    inputs = (torch.randn(4, 5), torch.randn(4, 5))
    assert {"aten.subtract", "aten.greater", "aten.multiply", "aten.negative"} <= ops_in(capture(fn, inputs))
    gm, ctx = run_pass(CanonicalizePass(), fn, inputs)
    assert ctx.counters["canonicalize_alias"] == 4
    assert {"aten.sub", "aten.gt", "aten.mul", "aten.neg"} <= ops_in(gm)
    assert not {"aten.subtract", "aten.greater", "aten.multiply", "aten.negative"} & ops_in(gm)
    torch.testing.assert_close(gm(*inputs), fn(*inputs), rtol=0, atol=0)


def test_an_alias_replacement_goes_through_the_other_rewrites() -> None:
    """The short-named op an alias becomes is rewritten in turn: `torch.multiply(x, 1.0)` goes like `x * 1.0`, and
    a softmax written with `torch.divide` becomes `softmax` like one written with `/`."""

    def fn(x: Tensor) -> Tensor:
        e = (x - x.amax(-1, keepdim=True)).exp()
        return torch.divide(e, e.sum(-1, keepdim=True)) + torch.multiply(x, 1.0)

    inputs = (randn(4, 33, seed=5),)
    assert {"aten.multiply", "aten.divide"} <= ops_in(capture(fn, inputs))
    gm, ctx = canonicalize(fn, inputs)
    assert ctx.counters["canonicalize_alias"] == 2
    assert ctx.counters["canonicalize_removed"] == 1 and ctx.counters["canonicalize_softmax"] == 1
    assert not {"aten.mul", "aten.div", "aten.multiply", "aten.divide"} & ops_in(gm), gm.code
    torch.testing.assert_close(gm(*inputs), fn(*inputs))
