"""Learned attention biases train through the fused op: T5's bucketed relative-position bias (an nn.Embedding), a
[1, H, N, N] bias parameter (also as SDPA's mask under causal masking), learned ALiBi slopes and learned RoPE tables,
compiled with backend="tilefuse" (strict), get eager's gradient at every step and change, while only the fused
attention and its fused backward run (counted with the profiler)."""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

HEADS, DIM, SEQ, BATCH, STEPS = 4, 32, 16, 2, 3


def relative_position_bucket(relative: Tensor, num_buckets: int = 8, max_distance: int = 16) -> Tensor:
    """T5's bidirectional bucketing of key - query distances: exact for small ones, log-spaced beyond."""
    num_buckets //= 2
    buckets = (relative > 0).long() * num_buckets
    distance = relative.abs()
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.out = nn.Linear(DIM, DIM, bias=False)

    def bias(self, n: int) -> Tensor:
        raise NotImplementedError

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        scores = q @ k.transpose(-1, -2) + bias  # T5 does not scale the scores
        return scores.float().softmax(dim=-1).type_as(scores) @ v

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        return self.out(self.attend(q, k, v, self.bias(n)).transpose(1, 2).reshape(b, n, DIM))


class T5RelativeBias(_Attention):
    def __init__(self) -> None:
        super().__init__()
        self.relative_attention_bias = nn.Embedding(8, HEADS)

    def bias(self, n: int) -> Tensor:
        positions = torch.arange(n, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None])
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, N, N]


class LearnedBias(_Attention):
    def __init__(self) -> None:
        super().__init__()
        self.learned = nn.Parameter(0.5 * torch.randn(1, HEADS, SEQ, SEQ))

    def bias(self, n: int) -> Tensor:
        return self.learned[..., :n, :n]


class LearnedBiasCausalSdpa(LearnedBias):
    """The bias as SDPA's float attn_mask, plus causal masking folded in by masked_fill."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(future, float("-inf")))


class LearnedAlibiSlopes(_Attention):
    """ALiBi with learned per-head slopes: slope · (k - q) added to the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.slopes = nn.Parameter(2.0 ** -torch.arange(1.0, HEADS + 1))

    def bias(self, n: int) -> Tensor:
        positions = torch.arange(n, device=self.slopes.device)
        return self.slopes[:, None, None] * (positions[None, :] - positions[:, None])


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LearnedRopeTables(_Attention):
    """HF-style RoPE with learned cos/sin tables: the rope ops are absorbed into the attention op, whose backward
    then owes the tables their gradient."""

    def __init__(self) -> None:
        super().__init__()
        angles = torch.arange(SEQ)[:, None] * 0.3 ** torch.arange(DIM // HEADS // 2)
        self.cos = nn.Parameter(torch.cat((angles, angles), dim=-1).cos())
        self.sin = nn.Parameter(torch.cat((angles, angles), dim=-1).sin())

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        cos, sin = self.cos[: q.shape[-2]], self.sin[: q.shape[-2]]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def bias(self, n: int) -> Tensor:
        return torch.zeros(())


MODELS: dict[str, tuple[Callable[[], _Attention], str]] = {
    "learned_rope_tables": (LearnedRopeTables, "cos"),
    "learned_alibi_slopes": (LearnedAlibiSlopes, "slopes"),
    "t5_relative_bias": (T5RelativeBias, "relative_attention_bias.weight"),
    "learned_bias": (LearnedBias, "learned"),
    "learned_bias_causal_sdpa": (LearnedBiasCausalSdpa, "learned"),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor) -> dict[str, Tensor]:
    opt.zero_grad()
    model(x).square().mean().backward()
    named = model.named_parameters()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in named if p.grad is not None}
    opt.step()
    return grads


def _tilefuse_ops(fn: Callable[[], object]) -> Counter[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name.startswith("tilefuse::"))


@pytest.mark.parametrize("name", list(MODELS))
def test_learned_bias_trains_like_eager(name: str) -> None:
    make, bias_name = MODELS[name]
    torch.manual_seed(0)
    eager = make()
    ours = copy.deepcopy(eager)
    initial = dict(ours.named_parameters())[bias_name].detach().clone()
    compiled = torch.compile(ours, backend="tilefuse", options={"strict": True})
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, ours)]
    x = torch.randn(BATCH, SEQ, DIM, generator=torch.Generator().manual_seed(1))
    ran: Counter[str] = Counter()
    for step in range(STEPS):  # the last step runs warm: the profiler sees only what the compiled model runs
        want = _step(eager, opts[0], x)
        got: dict[str, Tensor] = {}
        ran = _tilefuse_ops(lambda: got.update(_step(compiled, opts[1], x)))  # noqa: B023
        assert got.keys() == want.keys(), f"step {step}: gradients of {sorted(want.keys() - got.keys())} missing"
        for param, grad in want.items():
            torch.testing.assert_close(got[param], grad, atol=2e-6, rtol=1e-4, msg=lambda m: f"d{param}: {m}")  # noqa: B023
    assert ran == Counter({"tilefuse::attention": 1, "tilefuse::attention_backward": 1}), ran  # RoPE absorbed
    bias = dict(ours.named_parameters())[bias_name].detach()
    assert not torch.equal(bias, initial)
    torch.testing.assert_close(bias, dict(eager.named_parameters())[bias_name].detach(), atol=1e-5, rtol=1e-4)
