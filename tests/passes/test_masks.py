"""Mask analysis: causal and window flags come from the tightest key-query distance bounds, aligned together;
what the flags cannot state stays a data atom, and masks built from tril/triu/arange are read as positions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.fx as fx
from torch import Tensor

from tilefuse.compiler.capture import capture
from tilefuse.passes.masks import Constraint, PositionalMask, analyze_keep, classify, keep_from_additive
from tilefuse.passes.positions import constant_value, index_expr

NEG_INF = float("-inf")


def _atom(name: str) -> fx.Node:
    return fx.Graph().placeholder(name)


def upper(bound: float, op: str = "le") -> Constraint:
    """k - q <op> bound, written as -q + k - bound <op> 0."""
    return Constraint(-1.0, 1.0, -bound, op, _atom(f"upper{bound}"))


def lower(bound: float, op: str = "ge") -> Constraint:
    return Constraint(-1.0, 1.0, -bound, op, _atom(f"lower{bound}"))


@pytest.mark.parametrize("order", [1, -1])
def test_tightest_causal_bound_wins_in_any_order(order: int) -> None:
    facts, leftover = classify([upper(0), upper(12)][::order], q_len=5, kv_len=17)
    assert facts == PositionalMask(causal=True, align="top_left") and not leftover


def test_bottom_right_window_is_counted_from_aligned_positions() -> None:
    offset, window = 12, 4  # keep k <= q + 12 and (q + 12) - k < 4, i.e. k - q >= 9
    facts, leftover = classify([upper(offset), lower(offset - window + 1)], q_len=5, kv_len=17)
    assert facts == PositionalMask(causal=True, align="bottom_right", window=window) and not leftover


def test_top_left_window_with_bottom_right_causal() -> None:
    """q - k < 4 on top-left positions, with bottom-right causal: the window is 4 + offset from pos(i)."""
    facts, leftover = classify([upper(12), lower(-3, "ge")], q_len=5, kv_len=17)
    assert facts == PositionalMask(causal=True, align="bottom_right", window=16) and not leftover


@pytest.mark.parametrize(
    ("constraints", "expected"),
    [
        ([lower(-3)], PositionalMask(window=4)),
        ([lower(-3), lower(-1)], PositionalMask(window=2)),  # the tighter lower bound implies the looser
        ([upper(0.5)], PositionalMask(causal=True)),  # k - q <= 0.5 on integers is k - q <= 0
        ([upper(1, "lt")], PositionalMask(causal=True)),
        ([lower(-4, "gt")], PositionalMask(window=4)),
    ],
)
def test_integer_bounds(constraints: list[Constraint], expected: PositionalMask) -> None:
    facts, leftover = classify(constraints, q_len=17, kv_len=17)
    assert facts == expected and not leftover


def test_bounds_the_flags_cannot_state_stay_data() -> None:
    unaligned, empty_window, diagonal = upper(3), lower(2), Constraint(-1.0, 1.0, 0.0, "eq", _atom("diag"))
    facts, leftover = classify([unaligned, empty_window, diagonal], q_len=17, kv_len=17)
    assert facts == PositionalMask()
    assert {node.name for node, _ in leftover} == {"upper3", "lower2", "diag"}


# ------------------------------------------------------------------------------------------- graph masks
def mask_node(fn: Callable[..., Tensor], *inputs: Tensor) -> fx.Node:
    """The node `fn` returns, in its captured graph."""
    gm = capture(fn, inputs)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    result = out.args[0]
    return result[0] if isinstance(result, (tuple, list)) else result


def _classified(node: fx.Node, negated: bool, n: int = 7) -> tuple[PositionalMask, int]:
    facts = analyze_keep(node, negated)
    positional, leftover = classify(facts.constraints, n, n)
    return positional, len(facts.data) + len(leftover)


def test_float_tril_compared_with_zero_is_causal() -> None:
    node = mask_node(lambda x: torch.tril(torch.ones(7, 7)) == 0, torch.ones(1))
    assert _classified(node, negated=True) == (PositionalMask(causal=True), 0)


def test_additive_triu_of_neg_inf_is_causal() -> None:
    node = mask_node(lambda x: torch.triu(torch.full((7, 7), NEG_INF), 1), torch.ones(1))
    keep = keep_from_additive(node)
    assert keep is not None
    assert _classified(*keep) == (PositionalMask(causal=True), 0)


def test_bool_cast_of_a_float_mask_is_a_data_atom() -> None:
    node = mask_node(lambda m: m.bool(), torch.ones(2, 1, 7, 7))
    facts = analyze_keep(node)
    assert not facts.constraints and len(facts.data) == 1


def test_int_mask_compared_with_zero_stays_one_atom() -> None:
    node = mask_node(lambda m: m == 0, torch.ones(2, 1, 1, 7, dtype=torch.long))
    facts = analyze_keep(node, True)
    assert facts.data == [(node, True)] and not facts.constraints


def test_an_all_ones_mask_built_in_the_graph_and_indexed_by_position_keeps_everything() -> None:
    """transformers before 5.2x build `torch.ones(b, n)` when no mask is passed and read it as
    `mask.bool()[:, None, None, kv_idx]`: every key is kept, so nothing is left as data."""

    def padding(x: Tensor) -> Tensor:
        kv_idx = torch.arange(7)
        return torch.ones(2, 7).to(torch.bool)[torch.arange(2)[:, None, None, None], kv_idx[None, None, None, :]]

    node = mask_node(padding, torch.ones(1))
    assert _classified(node, negated=False) == (PositionalMask(), 0)


@pytest.mark.parametrize("written", [False, True])
def test_an_all_ones_mask_that_is_written_is_data(written: bool) -> None:
    def padding(x: Tensor) -> Tensor:
        keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        if written:
            keep[..., :2] = False  # left padding written into the "constant"
        return keep

    facts = analyze_keep(mask_node(padding, torch.ones(1)))
    assert len(facts.data) == int(written) and not facts.constraints


def _hf_positions_mask(prepend_step: int = 1, packed_positions: bool = False) -> Callable[[Tensor], Tensor]:
    """transformers 5.2x under torch.compile: causal as `pos[b, kv] <= pos[b, q]` read through index tensors, and
    the packed-sequence overlay `seq[b, q] == seq[b, kv]` with seq = (diff(pos, prepend=pos[:, :1] - 1) != 1)
    .cumsum(-1), all 0 when the positions are one arange."""

    def mask(x: Tensor) -> Tensor:
        b, n = 2, 7
        pos = torch.arange(n)[None].expand(b, n)
        if packed_positions:
            pos = torch.cat([torch.arange(3), torch.arange(n - 3)])[None].expand(b, n)  # two sequences
        b_idx = torch.arange(b)[:, None, None, None]
        q_idx, kv_idx = torch.arange(n)[None, None, :, None], torch.arange(n)[None, None, None, :]
        seq = (torch.diff(pos, prepend=pos[:, :1] - prepend_step, dim=-1) != 1).cumsum(-1)
        return (pos[b_idx, kv_idx] <= pos[b_idx, q_idx]) & (seq[b_idx, q_idx] == seq[b_idx, kv_idx])

    return mask


def test_hf_mask_functions_over_indexed_positions_are_causal() -> None:
    node = mask_node(_hf_positions_mask(), torch.ones(1))
    assert _classified(node, negated=False) == (PositionalMask(causal=True), 0)


def test_hf_packed_sequence_overlay_of_two_sequences_stays_data() -> None:
    node = mask_node(_hf_positions_mask(packed_positions=True), torch.ones(1))
    facts = analyze_keep(node)
    positional, leftover = classify(facts.constraints, 7, 7)
    assert len(facts.data) + len(leftover) >= 1  # the overlay is kept as data
    assert not positional.causal  # positions of two sequences are no band either


def test_an_overlay_index_arithmetic_cannot_prove_is_read_from_its_constant_value() -> None:
    """With prepend = pos[:, :1] (not one step before) the symbolic diff is no constant, but every position is
    built from constants: its value (one sequence whose first step counts as a start) keeps every pair."""
    node = mask_node(_hf_positions_mask(prepend_step=0), torch.ones(1))
    assert _classified(node, negated=False) == (PositionalMask(causal=True), 0)


def test_positions_read_through_negative_indices_are_not_affine() -> None:
    """x[-1 - i] wraps around: an index tensor that can be negative is not taken as an affine position; the
    value, computed from constants, is still read right (here the wrap-around gives arange(7) back)."""
    node = mask_node(lambda x: torch.arange(7)[torch.arange(-7, 0)], torch.ones(1))
    assert index_expr(node) is None
    value = constant_value(node)
    assert value is not None and value.tolist() == list(range(7))


def test_a_mask_read_from_data_or_randomness_has_no_constant_value() -> None:
    data = mask_node(lambda x: torch.arange(7)[:, None] <= torch.arange(7)[None, :] + x.long(), torch.ones(1))
    random = mask_node(lambda x: torch.rand(7, 7) > 0.5, torch.ones(1))
    assert constant_value(data) is None and constant_value(random) is None


def test_a_constant_mask_written_from_outside_its_computation_has_no_value() -> None:
    def written(x: Tensor) -> Tensor:
        keep = torch.tril(torch.ones(7, 7, dtype=torch.bool))
        keep[0] = x[0] > 0  # data written into the "constant" after it was built
        return keep

    facts = analyze_keep(mask_node(written, torch.ones(1)))
    assert len(facts.data) == 1 and not facts.constraints
