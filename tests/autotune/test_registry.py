"""The compile-time registry: every kernel family of every fused site gets a config (mode "model", no GPU), and the
CUDA launchers in codegen/gpu.py pass each family's knobs on (launchers replaced by spies: nothing runs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tilefuse.autotune import registry
from tilefuse.codegen import attention_bwd, attention_decode, gpu, norm_kernels, rope_kernels
from tilefuse.codegen import reference as ref
from tilefuse.codegen.plan import TileConfig
from tilefuse.passes.base import Site
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec

PREFILL = AttentionSpec(1, 4, 4, 64, 64, 32, 32, "bfloat16", 0.125, causal=True)
DECODE = AttentionSpec(1, 4, 2, 1, 256, 16, 16, "float32", 0.25, gqa_group=2)
NORM = NormSpec("rmsnorm", 32, (2, 8, 32), "float32", 1e-6)
ROPE = RopeSpec("rotate_half", 16, 16, (1, 2, 8, 16), "float32")


def test_model_mode_resolves_every_family_of_every_site(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEFUSE_GPU", "h100")
    absorbed = RopeSpec("interleaved", 32, 32, (1, 4, 64, 32), "bfloat16")  # RoPE inside attention: no kernel
    sites = [Site("attention", "fused", "a", PREFILL), Site("attention", "fused", "d", DECODE),
             Site("norm", "fused", "n", NORM), Site("rope", "fused", "r", ROPE),
             Site("rope", "fused", "r2", absorbed, detail={"fused_into": "a"}),
             Site("norm", "declined", "n2", None, reason="no")]  # fmt: skip
    chosen = registry.resolve_sites(sites, "model")
    assert set(chosen) == {
        (PREFILL, "attention"), (PREFILL, "attention_backward"), (DECODE, "attention_decode"),
        (DECODE, "attention_backward"), (NORM, "norm"), (NORM, "norm_backward"), (ROPE, "rope"),
    }  # fmt: skip
    assert all(c.source == "model" for c in chosen.values())
    assert registry.config_for(NORM, "norm_backward") == chosen[(NORM, "norm_backward")].config
    assert chosen[(ROPE, "rope")].config.block_m <= 16  # 16 rows: never more rows per program than that
    assert registry.config_for(DECODE) == chosen[(DECODE, "attention_decode")].config  # the forward by default


def test_a_failing_family_leaves_the_others_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    from tilefuse.autotune import search

    monkeypatch.setenv("TILEFUSE_GPU", "h100")
    real = search.tune_spec

    def broken_backward(spec: Any, gpu: Any, settings: Any = None, *, kind: str | None = None, **kw: Any) -> Any:
        if kind == "norm_backward":
            raise RuntimeError("synthetic")
        return real(spec, gpu, settings, kind=kind, **kw)

    monkeypatch.setattr(search, "tune_spec", broken_backward)
    chosen = registry.resolve_sites([Site("norm", "fused", "n", NORM)], "model")
    assert set(chosen) == {(NORM, "norm")}


# Keyword arguments that say what a kernel computes (NormSpec's eps placement), not how it is tiled.
_SEMANTIC_KEYWORDS = frozenset({"eps", "eps_mode", "norm_scale"})


def _spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str, result: Callable[..., Any]) -> list[dict]:
    seen: list[dict[str, Any]] = []

    def spy(*args: Any, **knobs: Any) -> Any:
        seen.append({k: v for k, v in knobs.items() if k not in _SEMANTIC_KEYWORDS})
        return result(*args)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_launchers_get_the_knobs_of_their_family(monkeypatch: pytest.MonkeyPatch) -> None:
    norm_fwd = _spy(monkeypatch, norm_kernels, "norm_forward_triton", lambda x, *a: (x, None, None, x))
    norm_bwd = _spy(monkeypatch, norm_kernels, "norm_backward_triton", lambda g, x, w, *a: (g, w, g[0, 0]))
    rope = _spy(monkeypatch, rope_kernels, "rope_forward_triton", lambda x, *a: x)
    rope_bwd = _spy(monkeypatch, rope_kernels, "rope_backward_triton", lambda g, *a: g)
    decode = _spy(monkeypatch, attention_decode, "attention_decode_triton", lambda i, f: (i.q, i.q[..., 0]))
    backward = _spy(monkeypatch, attention_bwd, "attention_backward_triton", lambda g, i, *a: (i.q, i.k, i.v))
    x, w = torch.randn(2, 8, 32), torch.ones(32)
    xr, cos, sin = torch.randn(1, 2, 8, 16), torch.ones(8, 16), torch.zeros(8, 16)
    inputs = ref.AttnInputs(torch.randn(1, 4, 1, 16), torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16))
    flags = ref.AttnFlags(0.25)

    def launch_all() -> None:
        gpu.norm(x, w, None, None, 1e-6, 0.0, True)
        gpu.norm_backward(x, x, w, 1e-6, 0.0, True)
        gpu.rope(xr, cos, sin, 0, 16)
        gpu.rope_backward(xr, cos, sin, 0, 16, torch.float32)
        gpu.attention_with_lse(inputs, flags)
        gpu.attention_backward(inputs.q, inputs, flags, inputs.q, inputs.q[..., 0])

    launch_all()  # nothing chosen: every launcher default
    registry.register(NORM, TileConfig(block_n=32, num_warps=2), "db", "norm")
    registry.register(NORM, TileConfig(block_n=16, num_warps=8, num_splits=3), "db", "norm_backward")
    registry.register(ROPE, TileConfig(block_m=4, num_warps=1), "db", "rope")
    registry.register(DECODE, TileConfig(block_n=32, num_warps=2, num_stages=1, num_splits=4), "db")
    registry.register(DECODE, TileConfig(16, 32, 2, 1), "db", "attention_backward")
    launch_all()
    assert norm_fwd == [{}, {"num_warps": 2, "block": 32}]
    assert norm_bwd == [{}, {"num_warps": 8, "programs": 3, "block": 16}]
    assert rope == rope_bwd == [{}, {"block_rows": 4, "num_warps": 1}]
    assert decode[1:] == [{"block_n": 32, "num_splits": 4, "num_warps": 2, "num_stages": 1}]
    assert backward == [{}, {"block_m": 16, "block_n": 32, "num_warps": 2, "num_stages": 1}]
    registry.clear()
    gpu.norm(torch.randn(64, 32), w, None, None, 1e-6, 0.0, True)  # another row bucket: the default
    assert norm_fwd[-1] == {}
