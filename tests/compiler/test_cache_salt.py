"""torch's on-disk compile caches never replay a graph compiled by another version of tilefuse's sources."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

from tilefuse.compiler import cache_salt
from tilefuse.compiler.backend import TilefuseBackend
from tilefuse.compiler.options import Options


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))


def _compile_and_run(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    torch._dynamo.reset()
    backend = TilefuseBackend(Options(strict=True, inner="inductor"))
    out: Tensor = torch.compile(model, backend=backend)(*inputs)
    out.sum().backward()
    assert backend.report.summary()["attention"]["fused"] == 1
    return out


@pytest.mark.slow
def test_a_changed_source_hash_misses_the_aot_autograd_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = _Attention()
    inputs = tuple(torch.randn(1, 2, 8, 8, requires_grad=True) for _ in range(3))
    with fresh_cache():
        counters.clear()
        _compile_and_run(model, inputs)
        _compile_and_run(model, inputs)
        hits = counters["aot_autograd"]["autograd_cache_hit"]
        assert hits >= 1, f"the same sources should hit the cache: {dict(counters['aot_autograd'])}"
        monkeypatch.setattr(cache_salt, "source_hash", lambda: "another tilefuse")
        _compile_and_run(model, inputs)
        assert counters["aot_autograd"]["autograd_cache_hit"] == hits, "another tilefuse replayed a cached graph"


def test_the_salt_keeps_a_user_pass_and_its_uuid() -> None:
    calls: list[str] = []

    class UserPass(cache_salt.CustomGraphPass):
        def __call__(self, graph: torch.fx.graph.Graph) -> None:
            calls.append("user")

        def uuid(self) -> str:
            return "user-pass-v1"

    salt = cache_salt.TilefuseCacheSalt(UserPass())
    salt(torch.fx.Graph())
    assert calls == ["user"]
    assert salt.uuid() == ("tilefuse", cache_salt.source_hash(), "user-pass-v1")
    assert cache_salt.TilefuseCacheSalt(lambda graph: None).uuid() is None  # no uuid: Inductor skips its cache
