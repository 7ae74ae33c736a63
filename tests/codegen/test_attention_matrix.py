"""The attention kernels over the variant matrix, forward and backward, plus a hypothesis sweep (interpreter).

A covering design rather than the full cross product, which the interpreter could not afford: every head dim
(16/40/59/64/111/128), sequence length (1/17/113/255), GQA group (1/2/4), dtype, mask kind and layout appears,
with N_q != N_k, fully masked rows, fp16 inputs scaled x5 and strided (HF [B, N, H, D] transposed) inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed; the Triton attention kernels cannot run")

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_attention_bwd_kernel import _check_against_golden as _check_backward
from test_attention_fwd_kernel import VARIANTS, _make_inputs
from test_attention_fwd_kernel import _check_against_golden as _check_forward

from tilefuse.codegen import reference as ref

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _strided(inputs: ref.AttnInputs) -> ref.AttnInputs:
    """q, k, v as views of [B, N, H, D] buffers (the layout HF projections produce), not contiguous."""

    def relayout(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    strided = inputs._replace(q=relayout(inputs.q), k=relayout(inputs.k), v=relayout(inputs.v))
    assert not strided.q.is_contiguous()
    return strided


def _scaled(inputs: ref.AttnInputs, factor: float) -> ref.AttnInputs:
    return inputs._replace(q=inputs.q * factor, k=inputs.k * factor, v=inputs.v * factor)


# (Nq, Nk, head_dim, group, dtype, variant, layout): layout "strided" or "x5" (fp16 overflow pressure) or "".
FORWARD_CASES = [
    (255, 255, 64, 1, BF16, "causal_top_left", ""),
    (113, 113, 128, 2, F32, "plain", "strided"),
    (113, 255, 59, 4, BF16, "causal_bottom_right", ""),
    (255, 113, 111, 2, F16, "window", "x5"),
    (1, 255, 128, 4, BF16, "key_padding", ""),
    (17, 113, 111, 1, F32, "additive", "strided"),
    (113, 17, 40, 2, BF16, "alibi", ""),
    (17, 17, 16, 4, F16, "softcap", "x5"),
    (255, 17, 59, 1, F32, "causal_bottom_right", ""),  # Nq > Nk bottom-right: the first rows see no key
    (113, 113, 64, 2, F16, "causal_window", "strided"),
    (1, 17, 40, 1, F16, "plain", "x5"),
]
BACKWARD_CASES = [
    (113, 113, 64, 2, BF16, "causal_top_left", "strided"),
    (113, 113, 111, 1, F32, "plain", ""),
    (17, 113, 59, 4, F16, "causal_bottom_right", "x5"),
    (113, 17, 128, 2, BF16, "key_padding", ""),
    (17, 17, 40, 4, F32, "additive", "strided"),
    (17, 113, 16, 2, BF16, "window", ""),
    (1, 113, 64, 2, F32, "alibi", ""),
    (17, 17, 59, 1, F16, "softcap", ""),
]


def _case(nq: int, nk: int, d: int, group: int, dtype: torch.dtype, variant: str, layout: str):  # type: ignore[no-untyped-def]
    inputs, flags = _make_inputs(nq, nk, d, group, dtype, variant, seed=nq + nk + d)
    if layout == "strided":
        inputs = _strided(inputs)
    elif layout == "x5":
        inputs = _scaled(inputs, 5.0)
    return inputs, flags


def _ids(cases: list[tuple]) -> list[str]:  # type: ignore[type-arg]
    return [f"{nq}x{nk}-d{d}-g{g}-{str(dt)[6:]}-{v}{'-' + lay if lay else ''}" for nq, nk, d, g, dt, v, lay in cases]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=_ids(FORWARD_CASES))
def test_forward_matrix(case: tuple) -> None:  # type: ignore[type-arg]
    _check_forward(*_case(*case))


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=_ids(BACKWARD_CASES))
def test_backward_matrix(case: tuple) -> None:  # type: ignore[type-arg]
    _check_backward(*_case(*case))


# Fixed examples (derandomize), no example database, and no shrinking: a failure is reported as drawn, and the
# interpreter's cost per example keeps shrinking from running for minutes.
_SWEEP = settings(
    max_examples=25, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip


@_SWEEP
@given(
    nq=st.integers(1, 48),
    nk=st.integers(1, 48),
    head_dim=st.sampled_from([16, 24, 40, 59, 64]),
    group=st.sampled_from([1, 2, 4]),
    dtype=st.sampled_from([F32, BF16, F16]),
    variant=st.sampled_from(["plain", *VARIANTS, "softcap", "alibi"]),
    strided=st.booleans(),
)
def test_forward_sweep(
    nq: int, nk: int, head_dim: int, group: int, dtype: torch.dtype, variant: str, strided: bool
) -> None:
    inputs, flags = _make_inputs(nq, nk, head_dim, group, dtype, variant, seed=nq * 64 + nk)
    _check_forward(_strided(inputs) if strided and nq > 1 and nk > 1 else inputs, flags)


@_SWEEP
@given(
    nq=st.integers(1, 40),
    nk=st.integers(1, 40),
    head_dim=st.sampled_from([16, 40, 59]),
    group=st.sampled_from([1, 2]),
    dtype=st.sampled_from([F32, BF16]),
    variant=st.sampled_from(["plain", *VARIANTS, "softcap", "alibi"]),
)
def test_backward_sweep(nq: int, nk: int, head_dim: int, group: int, dtype: torch.dtype, variant: str) -> None:
    _check_backward(*_make_inputs(nq, nk, head_dim, group, dtype, variant, seed=nq * 64 + nk))


@pytest.mark.parametrize("case", FORWARD_CASES[:3], ids=_ids(FORWARD_CASES[:3]))
def test_forward_is_bitwise_deterministic(case: tuple) -> None:  # type: ignore[type-arg]
    from tilefuse.codegen.attention_fwd import attention_forward_triton

    inputs, flags = _case(*case)
    first, second = attention_forward_triton(inputs, flags), attention_forward_triton(inputs, flags)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
