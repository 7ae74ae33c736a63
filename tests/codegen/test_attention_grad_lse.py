"""A gradient on attention's log-sum-exp (what attention sinks send back): the reference backward against autograd
of the plain fp64 math, and the Triton backward (under the interpreter) against the reference."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton", reason="triton is not installed; the Triton attention kernels cannot run")

from test_attention_fwd_kernel import _as_fp64, _make_inputs

from tilefuse.codegen import reference as ref
from tilefuse.codegen.attention_bwd import attention_backward_triton
from tilefuse.codegen.attention_fwd import attention_forward_triton

CASES = [("plain", (13, 13), 1), ("causal_bottom_right", (17, 9), 2), ("key_padding", (9, 20), 2),
         ("softcap", (16, 16), 1), ("window", (24, 17), 2)]  # fmt: skip
IDS = [f"{variant}-{shape}-g{group}" for variant, shape, group in CASES]


def _grads(inputs: ref.AttnInputs, seed: int = 1) -> tuple[Tensor, Tensor]:
    """(grad_out, grad_lse) drawn for the inputs' shapes."""
    q, v = inputs.q, inputs.v
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(*q.shape[:3], v.shape[3], generator=gen).to(q.dtype)
    return grad_out, torch.randn(*q.shape[:3], generator=gen)


def _autograd_golden(inputs: ref.AttnInputs, flags: ref.AttnFlags, grad_out: Tensor, grad_lse: Tensor) -> list[Tensor]:
    """d/d(q, k, v) of Σ out·grad_out + Σ lse·grad_lse, by autograd through the fp64 scores."""
    leaves = [t.detach().double().requires_grad_() for t in inputs[:3]]
    fp64 = _as_fp64(inputs)._replace(q=leaves[0], k=leaves[1], v=leaves[2])
    scores, _ = ref.masked_scores(fp64, flags)
    lse = torch.logsumexp(scores, dim=-1)
    out = ref.attention_forward(fp64, flags)
    finite = torch.isfinite(lse)  # a fully masked row's lse is -inf and takes no gradient
    total = (out * grad_out.double()).sum() + (lse[finite] * grad_lse.double()[finite]).sum()
    return list(torch.autograd.grad(total, leaves))


@pytest.mark.parametrize(("variant", "shape", "group"), CASES, ids=IDS)
def test_reference_backward_takes_the_lse_gradient(variant: str, shape: tuple[int, int], group: int) -> None:
    inputs, flags = _make_inputs(*shape, 16, group, torch.float64, variant)
    grad_out, grad_lse = _grads(inputs)
    ours = ref.attention_backward(grad_out, inputs, flags, grad_lse.double())
    for name, mine, want in zip("qkv", ours, _autograd_golden(inputs, flags, grad_out, grad_lse), strict=True):
        torch.testing.assert_close(mine, want, atol=1e-10, rtol=1e-9, msg=f"d{name}")


@pytest.mark.parametrize(("variant", "shape", "group"), CASES, ids=IDS)
def test_triton_backward_takes_the_lse_gradient(variant: str, shape: tuple[int, int], group: int) -> None:
    inputs, flags = _make_inputs(*shape, 16, group, torch.float32, variant)
    grad_out, grad_lse = _grads(inputs)
    out, lse = attention_forward_triton(inputs, flags)
    grad_lse = grad_lse.masked_fill(torch.isneginf(lse), 0.0)  # what sinks send a row with no key
    ours = attention_backward_triton(grad_out, inputs, flags, out, lse, grad_lse=grad_lse, block_m=16, block_n=16)
    want = ref.attention_backward(grad_out, inputs, flags, grad_lse)
    plain = ref.attention_backward(grad_out, inputs, flags)
    for name, mine, expected in zip("qkv", ours, want, strict=True):
        assert torch.isfinite(mine).all(), f"d{name}"
        torch.testing.assert_close(mine, expected, atol=2e-5, rtol=2e-5, msg=f"d{name}")
    assert not torch.allclose(ours[0], plain[0], atol=1e-3), "the lse gradient must change dq"
