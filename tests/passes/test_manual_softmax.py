"""Hand-written softmax: exp/sum chains, exp(x - logsumexp) and exp(log_softmax) become one softmax node
(canonicalize_softmax.py), so the attention around them fuses; chains that are not provably a softmax over the
reduced dim stay as written, and every graph computes what eager computes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from _helpers import as_double, assert_fused, assert_no_worse_than_eager, fuse, ops_in, sites
from torch import Tensor, nn

import tilefuse
from tilefuse.compiler.options import Options
from tilefuse.passes.base import PassContext

B, H, N, D = 2, 2, 33, 16
NEG_INF = float("-inf")
Probs = Callable[[Tensor], Tensor]  # scores -> probabilities over the last dim


# --------------------------------------------------------------------------------------------------- spellings
def amax_shift(s: Tensor) -> Tensor:
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def max_values_shift(s: Tensor) -> Tensor:
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def max_values_detached(s: Tensor) -> Tensor:
    e = torch.exp(s - s.max(-1, keepdim=True).values.detach())
    return e / e.sum(-1, keepdim=True)


def torch_max_getitem(s: Tensor) -> Tensor:
    e = torch.exp(s - torch.max(s, dim=-1, keepdim=True)[0])
    return e / e.sum(dim=-1, keepdim=True)


def positive_dim(s: Tensor) -> Tensor:
    e = torch.exp(s - s.amax(3, keepdim=True))
    return e / e.sum(3, keepdim=True)


def unshifted(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.sum(dim=-1, keepdim=True)


def logsumexp_normalized(s: Tensor) -> Tensor:
    return torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))


def log_softmax_exp(s: Tensor) -> Tensor:
    return torch.log_softmax(s, -1).exp()


def times_one_over_sum(s: Tensor) -> Tensor:
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e * (1 / e.sum(-1, keepdim=True))


def times_reciprocal(s: Tensor) -> Tensor:
    e = s.exp()
    return e * e.sum(-1, keepdim=True).reciprocal()


def fp32_upcast(s: Tensor) -> Tensor:
    x = s.float()
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)).to(s.dtype)


def by_name(*spellings: Probs) -> dict[str, Probs]:
    return {fn.__name__: fn for fn in spellings}


SPELLINGS = by_name(
    amax_shift,
    max_values_shift,
    max_values_detached,
    torch_max_getitem,
    positive_dim,
    unshifted,
    logsumexp_normalized,
    log_softmax_exp,
    times_one_over_sum,
    times_reciprocal,
    fp32_upcast,
)


class ManualAttention(nn.Module):
    """softmax(q·kᵀ · scale [causal]) @ v with the softmax spelled by `probs`."""

    def __init__(self, probs: Probs, scale: float | None = None, causal: bool = False) -> None:
        super().__init__()
        self.probs, self.scale, self.causal = probs, scale, causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s = (q @ k.transpose(-2, -1)) * (self.scale if self.scale is not None else q.shape[-1] ** -0.5)
        if self.causal:
            future = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).triu(1)
            s = s.masked_fill(future, NEG_INF)
        return self.probs(s) @ v


def qkv(n: int = N, dtype: torch.dtype = torch.float32, seed: int = 0, spread: float = 1.0) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(B, H, n, D, generator=gen) * spread).to(dtype) for _ in range(3))


def _run_with_grads(fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    return out.detach(), [x.grad for x in leaves if x.grad is not None]


def assert_matches_golden(gm: fx.GraphModule, module: nn.Module, inputs: tuple[Tensor, ...], floor: float) -> None:
    """Forward and input gradients against fp64 eager: err(ours) <= 2·err(eager) + floor forward, 3x backward."""
    ours, ours_grads = _run_with_grads(gm, inputs)
    eager, eager_grads = _run_with_grads(module, inputs)
    golden, golden_grads = _run_with_grads(as_double(module), tuple(x.double() for x in inputs))
    assert torch.isfinite(ours).all() and all(torch.isfinite(g).all() for g in ours_grads)
    assert ours.dtype == eager.dtype and ours.shape == eager.shape
    assert_no_worse_than_eager(ours, eager, golden, floor)
    assert len(ours_grads) == len(eager_grads) == len(inputs)
    for mine, theirs, gold in zip(ours_grads, eager_grads, golden_grads, strict=True):
        err_ours, err_eager = ((g.double() - gold).abs().max().item() for g in (mine, theirs))
        assert err_ours <= 3 * err_eager + floor, (err_ours, err_eager)


def assert_rewritten_and_fused(gm: fx.GraphModule, ctx: PassContext) -> Any:
    assert ctx.counters["canonicalize_softmax"] == 1, gm.code
    assert not ops_in(gm) & {"aten.exp", "aten.sum", "aten.logsumexp", "aten.log_softmax"}, gm.code
    (spec,) = assert_fused(gm, ctx)
    return spec


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_fuses_with_eager_numerics(name: str) -> None:
    module, inputs = ManualAttention(SPELLINGS[name]), qkv()
    gm, ctx = fuse(module, inputs)
    spec = assert_rewritten_and_fused(gm, ctx)
    assert not spec.causal and spec.mask == "none" and spec.scale == pytest.approx(D**-0.5)
    assert_matches_golden(gm, module, inputs, floor=1e-6)


@pytest.mark.parametrize("name", ["amax_shift", "unshifted", "logsumexp_normalized", "log_softmax_exp"])
def test_causal_and_scaled_spelling_fuses(name: str) -> None:
    module, inputs = ManualAttention(SPELLINGS[name], scale=0.3, causal=True), qkv(n=64)
    gm, ctx = fuse(module, inputs)
    spec = assert_rewritten_and_fused(gm, ctx)
    assert spec.causal and spec.scale == pytest.approx(0.3)
    assert_matches_golden(gm, module, inputs, floor=1e-6)


@pytest.mark.parametrize("name", ["fp32_upcast", "amax_shift", "log_softmax_exp"])
def test_bf16_spelling_fuses_and_is_no_worse_than_eager(name: str) -> None:
    module, inputs = ManualAttention(SPELLINGS[name]), qkv(dtype=torch.bfloat16)
    gm, ctx = fuse(module, inputs)
    assert assert_rewritten_and_fused(gm, ctx).dtype == "bfloat16"
    assert_matches_golden(gm, module, inputs, floor=2e-2)


def test_unshifted_form_is_right_where_eager_overflows() -> None:
    """exp(s) / Σ exp(s) overflows in fp32 once scores pass ~88 (inf / inf = NaN); the softmax shifts by the row
    max itself, so the fused site gives the true probabilities."""
    module, inputs = ManualAttention(unshifted), qkv(spread=8.0)
    gm, ctx = fuse(module, inputs)
    assert_rewritten_and_fused(gm, ctx)
    assert torch.isnan(module(*inputs)).any()
    q, k, v = (x.double() for x in inputs)
    golden = torch.softmax(q @ k.transpose(-2, -1) * D**-0.5, -1) @ v
    torch.testing.assert_close(gm(*inputs).double(), golden, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- not a softmax of s
def sum_over_other_dim(s: Tensor) -> Tensor:
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-2, keepdim=True)


def column_max_shift(s: Tensor) -> Tensor:
    e = torch.exp(s - s.amax(-2, keepdim=True))  # varies along the summed dim: not a softmax of s
    return e / e.sum(-1, keepdim=True)


def per_column_tensor_shift(s: Tensor) -> Tensor:
    e = torch.exp(s - torch.linspace(0.0, 3.0, s.shape[-1]))
    return e / e.sum(-1, keepdim=True)


def sum_of_another_tensor(s: Tensor) -> Tensor:
    return s.exp() / (2 * s).exp().sum(-1, keepdim=True)


def sum_broadcast_across_rows(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.sum(-1).unsqueeze(-2)  # row j's sum divides column j


def detached_logsumexp(s: Tensor) -> Tensor:
    return torch.exp(s - torch.logsumexp(s, -1, keepdim=True).detach())  # softmax's value, not its gradient


# name: (probabilities, whether the chain becomes a softmax (of the shifted scores), the attention's decline
# reason or None when no softmax anchors a site)
NOT_SOFTMAX_OF_S: dict[str, tuple[Probs, bool, str | None]] = {
    "sum_over_other_dim": (sum_over_other_dim, True, "softmax over dim 2"),
    "column_max_shift": (column_max_shift, True, "unsupported op aten.sub"),
    "per_column_tensor_shift": (per_column_tensor_shift, True, "unsupported op aten.sub"),
    "sum_of_another_tensor": (sum_of_another_tensor, False, None),
    "sum_broadcast_across_rows": (sum_broadcast_across_rows, False, None),
    "detached_logsumexp": (detached_logsumexp, False, None),
}


@pytest.mark.parametrize("name", sorted(NOT_SOFTMAX_OF_S))
def test_chain_that_is_not_a_softmax_of_the_scores_is_not_fused(name: str) -> None:
    check_not_fused(*NOT_SOFTMAX_OF_S[name])


def sum_without_keepdim(s: Tensor) -> Tensor:
    e = s.exp()
    return e / e.sum(-1)  # [B, H, N] sums broadcast as [1, B, H, N]: along the batch, not the keys


def test_sum_without_keepdim_is_not_rewritten() -> None:
    check_not_fused(sum_without_keepdim, False, None, n=H)  # N == H == B, so the shapes broadcast


def check_not_fused(probs: Probs, rewritten: bool, reason: str | None, n: int = N) -> None:
    module, inputs = ManualAttention(probs), qkv(n=n)
    gm, ctx = fuse(module, inputs)
    assert ctx.counters["canonicalize_softmax"] == rewritten, gm.code
    assert not ctx.counters["attention_fused"], gm.code
    declined = sites(ctx, "attention", "declined")
    assert [reason in (s.reason or "") for s in declined] == ([True] if reason else []), declined
    assert_matches_golden(gm, module, inputs, floor=1e-6)


class ReturnsExp(nn.Module):
    """Also returns the exp output (or the row sum): the hand-written form must stay for that reader."""

    def __init__(self, returned: str) -> None:
        super().__init__()
        self.returned = returned

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        e = torch.exp(s - s.amax(-1, keepdim=True))
        total = e.sum(-1, keepdim=True)
        return (e / total) @ v, e if self.returned == "exp" else total


@pytest.mark.parametrize("returned", ["exp", "sum"])
def test_exp_or_sum_read_elsewhere_keeps_the_hand_written_form(returned: str) -> None:
    module, inputs = ReturnsExp(returned), qkv()
    gm, ctx = fuse(module, inputs)
    assert not ctx.counters["canonicalize_softmax"] and not ctx.sites, gm.code
    assert {"aten.exp", "aten.sum"} <= ops_in(gm)
    for ours, eager in zip(gm(*inputs), module(*inputs), strict=True):
        torch.testing.assert_close(ours, eager, atol=0, rtol=0)


def test_shift_read_elsewhere_stays_for_its_reader() -> None:
    """A row max that something else reads stays in the graph; the softmax still replaces the chain, and the
    attention is declined because the scores escape through the max."""

    def fn(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        m = s.amax(-1, keepdim=True)
        e = torch.exp(s - m)
        return (e / e.sum(-1, keepdim=True)) @ v, m

    inputs = qkv()
    gm, ctx = fuse(fn, inputs)
    assert ctx.counters["canonicalize_softmax"] == 1 and "aten.amax" in ops_in(gm)
    assert "used outside" in (sites(ctx, "attention", "declined")[0].reason or "")
    for ours, eager in zip(gm(*inputs), fn(*inputs), strict=True):
        torch.testing.assert_close(ours, eager, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- minGPT module
class CausalSelfAttention(nn.Module):
    """minGPT's CausalSelfAttention with its hand-written softmax (a registered causal buffer, sliced per call)."""

    def __init__(self, n_embd: int = H * D, n_head: int = H, block_size: int = 64) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = torch.exp(att - att.max(dim=-1, keepdim=True).values)
        att = att / att.sum(dim=-1, keepdim=True)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


def _min_gpt() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return CausalSelfAttention().eval(), torch.randn(B, 37, H * D, generator=torch.Generator().manual_seed(1))


def test_min_gpt_attention_fuses_with_eager_numerics() -> None:
    module, x = _min_gpt()
    gm, ctx = fuse(module, (x,))
    spec = assert_rewritten_and_fused(gm, ctx)
    assert spec.scale == pytest.approx(D**-0.5) and (spec.causal or spec.mask == "boolean")
    assert_matches_golden(gm, module, (x,), floor=1e-6)


def test_min_gpt_attention_fuses_under_torch_compile() -> None:
    torch._dynamo.reset()
    module, x = _min_gpt()
    backend = tilefuse.TilefuseBackend(Options(inner="eager", strict=True))
    ours, ours_grads = _run_with_grads(torch.compile(module, backend=backend), (x,))
    eager, eager_grads = _run_with_grads(module, (x,))
    assert backend.report.summary()["attention"] == {"fused": 1, "declined": 0}
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_grads, eager_grads, atol=1e-5, rtol=1e-5)


def test_softmax_spelled_with_functional_ops_is_untouched() -> None:
    """A real softmax is left alone: the rewrite only adds anchors, it never moves existing ones."""
    module, inputs = ManualAttention(lambda s: F.softmax(s, dim=-1)), qkv()
    gm, ctx = fuse(module, inputs)
    assert not ctx.counters["canonicalize_softmax"]
    assert_fused(gm, ctx)
