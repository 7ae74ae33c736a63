"""The functional API tilefuse.ops: argument checks, semantics against plain torch, autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilefuse import ops
from tilefuse.codegen import reference as ref
from tilefuse.codegen.op_schema import RNG_HIGH


def _qkv(heads: int = 4, kv_heads: int = 2, n: int = 9, d: int = 16) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, h, n, d, generator=gen, requires_grad=True) for h in (heads, kv_heads, kv_heads))


def test_attention_matches_sdpa_with_gqa_and_grads() -> None:
    q, k, v = _qkv()
    out = ops.attention(q, k, v, causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    for got, exp in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_attention_rope_equals_rotating_first() -> None:
    q, k, v = _qkv(4, 4)
    gen = torch.Generator().manual_seed(1)
    cos, sin = torch.randn(9, 16, generator=gen), torch.randn(9, 16, generator=gen)
    fused = ops.attention(q, k, v, rope=(cos, sin))
    manual = ops.attention(ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin), v)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)


def test_attention_dropout_is_seeded_and_drops_p_of_the_probabilities() -> None:
    """With v = I, the output is the dropped probabilities P∘M/(1-p) themselves."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 64, 16, generator=gen), torch.randn(2, 4, 64, 16, generator=gen)
    v = torch.eye(64).expand(2, 4, 64, 64)
    torch.manual_seed(0)
    first = ops.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(0)
    assert torch.equal(ops.attention(q, k, v, dropout_p=0.3), first)
    assert not torch.equal(ops.attention(q, k, v, dropout_p=0.3), first)  # the generator moved on
    probs = ops.attention(q, k, v)
    dropped = (first == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.01, dropped
    kept = first != 0
    torch.testing.assert_close(first[kept], probs[kept] / 0.7, atol=1e-6, rtol=1e-5)
    assert torch.equal(ops.attention(q, k, v, dropout_p=0.0), probs)


def test_attention_dropout_forward_and_backward_use_one_mask() -> None:
    """Output and gradients equal the reference's for the rng ops.attention draws after the same manual_seed."""
    q, k, v = _qkv()
    torch.manual_seed(5)
    out = ops.attention(q, k, v, causal=True, dropout_p=0.2)
    torch.manual_seed(5)
    rng = torch.randint(0, RNG_HIGH, (2,), dtype=torch.int64)
    inputs = ref.AttnInputs(q.detach(), k.detach(), v.detach(), rng=rng)
    flags = ref.AttnFlags(0.25, True, True, dropout_p=0.2)
    torch.testing.assert_close(out, ref.attention_forward(inputs, flags), atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v), grad), ref.attention_backward(grad, inputs, flags), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_norms_match_torch() -> None:
    gen = torch.Generator().manual_seed(2)
    x, r, w, b = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.randn(8), torch.randn(8)
    torch.testing.assert_close(ops.layer_norm(x, w, b), F.layer_norm(x, (8,), w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w), torch.rms_norm(x, (8,), w, 1e-6), atol=1e-5, rtol=1e-5)
    normed, total = ops.rms_norm(x, w, residual=r)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(normed, torch.rms_norm(x + r, (8,), w, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"q": torch.randn(2, 4, 8)}, ValueError, "4 dims"),
        ({"k": torch.randn(2, 3, 9, 16), "v": torch.randn(2, 3, 9, 16)}, ValueError, "multiple"),
        ({"dropout_p": 1.0}, ValueError, "dropout_p"),
        ({"dropout_p": -0.1}, ValueError, "dropout_p"),
        ({"window": 0}, ValueError, "window"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"rope": (torch.randn(9, 6), torch.randn(9, 6)), "rotary_dim": 8}, ValueError, "rotary_dim"),
        ({"rope_layout": "spiral", "rope": (torch.randn(9, 16), torch.randn(9, 16))}, ValueError, "rope_layout"),
        ({"q": torch.randint(0, 3, (2, 4, 9, 16))}, ValueError, "dtype"),
        ({"attn_mask": [[True]]}, TypeError, "attn_mask"),
    ],
)
def test_attention_rejects_bad_arguments(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    q, k, v = (t.detach() for t in _qkv())
    args = {"q": q, "k": k, "v": v, **kwargs}
    with pytest.raises(error, match=message):
        ops.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)  # type: ignore[arg-type]


def test_norm_rejects_bad_arguments() -> None:
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="residual shape"):
        ops.layer_norm(x, residual=torch.randn(3, 9))
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, None, eps=0.0)
    with pytest.raises(ValueError, match="cos shape"):
        ops.apply_rope(x, torch.randn(3, 8), torch.randn(1, 8))


_INTERPRETED_OPS = """
import json, torch
from tilefuse import ops
from tilefuse.codegen import emit, reference as ref
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 17, 16, generator=gen) for _ in range(3))
out = ops.attention(q, k, v, causal=True)
golden = ref.attention_forward(ref.AttnInputs(q.double(), k.double(), v.double()), ref.AttnFlags(0.25, causal=True))
x, w = torch.randn(5, 24, generator=gen), torch.randn(24, generator=gen)
y = ops.rms_norm(x, w, 1e-6)
kernels = sorted({e.name for e in emit._memo.values()})
print(json.dumps({"err": (out.double() - golden).abs().max().item(), "kernels": kernels,
                  "norm_err": (y - x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w).abs().max().item()}))
"""


def test_cpu_tensors_run_the_triton_kernels_under_the_interpreter() -> None:
    """With TRITON_INTERPRET=1 (and no TILEFUSE_CPU_KERNELS override) the ops route CPU tensors to the kernels."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TILEFUSE_CPU_KERNELS"}
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_OPS], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"attention_fwd_kernel", "norm_forward_kernel"} <= set(report["kernels"])
    assert report["err"] < 1e-5 and report["norm_err"] < 1e-5


@pytest.mark.parametrize(
    ("config", "error"),
    [("64x64", TypeError), (dict(block_m=64), TypeError), ((48, 64, 4, 2), TypeError)],
    ids=["str", "dict", "tuple"],
)
def test_attention_config_must_be_a_tile_config(config: object, error: type[Exception]) -> None:
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(error, match="TileConfig"):
        ops.attention(q, q, q, config=config)  # type: ignore[arg-type]


def test_attention_config_blocks_must_be_powers_of_two() -> None:
    from tilefuse.codegen.plan import TileConfig

    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        ops.attention(q, q, q, config=TileConfig(48, 64))
    torch.testing.assert_close(ops.attention(q, q, q, config=TileConfig(16, 16, 2, 1)), ops.attention(q, q, q))
