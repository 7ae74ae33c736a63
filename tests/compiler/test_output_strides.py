"""Every fused op's output has the strides of the node it replaces, so code that views it keeps working.

For each rewrite kind (attention from SDPA and from a hand-written softmax, decode, RoPE inside attention and
alone, RMSNorm and LayerNorm, the residual add's two outputs) on inputs laid out as [B, N, H, D] projections seen
as [B, H, N, D]: the fused node's fake output strides equal the replaced node's (the traced graph's), and running
the rewritten graph gives eager's strides. Then torchtune's `output.transpose(1, 2).view(b, s, -1)` after SDPA
end to end under torch.compile (it used to fail tracing, and the whole graph fell back), with torchtune's own
MultiHeadAttention where torchtune installs; and the Triton attention launchers write the layout they are asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from tilefuse.codegen.layouts import dim_order, provably_same_layout
from tilefuse.compiler.backend import TilefuseBackend
from tilefuse.compiler.capture import capture
from tilefuse.compiler.options import Options
from tilefuse.compiler.pipeline import run_pipeline

B, N, H, D = 2, 6, 4, 8
BNHD = [0, 2, 1, 3]  # the order of a [B, N, H, D] buffer seen as [B, H, N, D]


def _heads(x: Tensor) -> Tensor:
    """[B, N, H·D] → [B, H, N, D], a view: the [B, N, H, D] layout a linear projection leaves."""
    return x.view(x.shape[0], x.shape[1], H, D).transpose(1, 2)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


def _rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * weight


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-5) * weight + bias


# Each case: (fn, inputs, the fused op that must replace the site). The site's output is the graph's output.
def _sdpa(qkv: Tensor) -> Tensor:
    q, k, v = (_heads(t) for t in qkv.unbind(0))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _sdpa_contiguous(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_efficient(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The CUDA memory-efficient kernel returns [B, N, H, D] memory whatever q's layout (its meta says so); no CPU
    kernel runs it, so only the traced graph is compared."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]


def _sdpa_decode(q: Tensor, kv: Tensor) -> Tensor:
    """Two query rows over more keys: the split-KV decode kernel's case on a GPU."""
    k, v = (_heads(t) for t in kv.unbind(0))
    return F.scaled_dot_product_attention(_heads(q), k, v)


def _manual_softmax(qkv: Tensor) -> Tensor:
    """softmax(QKᵀ/√d)·V by hand: the site's output is a matmul's, contiguous whatever the operands' layout."""
    q, k, v = (_heads(t) for t in qkv.unbind(0))
    return (q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ v


def _rope_attention(qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    q, k, v = (_heads(t) for t in qkv.unbind(0))
    return F.scaled_dot_product_attention(_rope(q, cos, sin), _rope(k, cos, sin), v, is_causal=True)


def _rope_alone(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _rope(_heads(x), cos, sin)


def _qk_rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    """torchtune's q_norm: RMSNorm over head_dim after the transpose to [B, H, N, D]."""
    return _rms_norm(_heads(x), weight)


def _qk_layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return _layer_norm(_heads(x), weight, bias)


def _add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    total = _heads(x) + residual  # the sum takes the first operand's [B, N, H, D] layout
    return _rms_norm(total, weight), total


def _add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    total = _heads(x) + residual
    return _layer_norm(total, weight, bias), total


def _randn(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=_GEN)


_GEN = torch.Generator().manual_seed(0)
_TABLES = (_randn(N, D), _randn(N, D))
CASES: dict[str, tuple[Callable[..., Any], tuple[Tensor, ...], str]] = {
    "sdpa": (_sdpa, (_randn(3, B, N, H * D),), "attention"),
    "sdpa_contiguous": (_sdpa_contiguous, tuple(_randn(B, H, N, D) for _ in range(3)), "attention"),
    "sdpa_efficient": (_sdpa_efficient, tuple(_randn(B, H, N, D) for _ in range(3)), "attention"),
    "sdpa_decode": (_sdpa_decode, (_randn(B, 2, H * D), _randn(2, B, 40, H * D)), "attention"),
    "manual_softmax": (_manual_softmax, (_randn(3, B, N, H * D),), "attention"),
    "rope_in_attention": (_rope_attention, (_randn(3, B, N, H * D), *_TABLES), "attention"),
    "rope": (_rope_alone, (_randn(B, N, H * D), *_TABLES), "rope"),
    "rms_norm": (_qk_rms_norm, (_randn(B, N, H * D), _randn(D)), "rms_norm"),
    "layer_norm": (_qk_layer_norm, (_randn(B, N, H * D), _randn(D), _randn(D)), "layer_norm"),
    "add_rms_norm": (_add_rms_norm, (_randn(B, N, H * D), _randn(B, H, N, D), _randn(D)), "add_rms_norm"),
    "add_layer_norm": (_add_layer_norm, (_randn(B, N, H * D), _randn(B, H, N, D), _randn(D), _randn(D)),
                       "add_layer_norm"),
}  # fmt: skip


def _output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _as_list(value: Any) -> list[Tensor]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@pytest.mark.parametrize("name", CASES)
def test_fused_output_has_the_replaced_strides(name: str) -> None:
    fn, inputs, op = CASES[name]
    gm = capture(fn, inputs)
    traced = [n.meta["val"] for n in _output_nodes(gm)]
    gm, ctx = run_pipeline(gm, Options())
    assert any(n.target is getattr(torch.ops.tilefuse, op).default for n in gm.graph.nodes), (ctx.sites, gm.code)
    fused = [n.meta["val"] for n in _output_nodes(gm)]
    for new, old in zip(fused, traced, strict=True):  # fake: the graph's view code was traced with these
        assert provably_same_layout(new, old), (name, new.stride(), old.stride())
    if name == "sdpa_efficient":
        assert dim_order(traced[0]) == BNHD
        return
    eager = _as_list(fn(*inputs))
    got = _as_list(gm(*inputs))
    for new, old, want in zip(got, traced, eager, strict=True):  # real: what the op returns, as eager and its fake
        same = provably_same_layout(new, want) and provably_same_layout(new, old)
        assert same, (name, new.stride(), want.stride(), old.stride())
        torch.testing.assert_close(new, want, atol=1e-5, rtol=1e-5)
    if name != "sdpa_contiguous" and not name.startswith("manual"):
        assert dim_order(eager[0]) == BNHD, "the case no longer tests a non-contiguous layout"


# --------------------------------------------------------------------------------------- torch.compile, end to end
class _TorchtuneStyleAttention(nn.Module):
    """torchtune's MultiHeadAttention tail: SDPA, then `transpose(1, 2).contiguous().view(b, s, -1)`; the
    `.contiguous()` is a no-op on SDPA's [B, N, H, D] output, so the view needs exactly that layout."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(H * D, 3 * H * D), nn.Linear(H * D, H * D)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(out.transpose(1, 2).contiguous().view(b, s, -1))


def _torchtune_mha() -> nn.Module:
    modules = pytest.importorskip("torchtune.modules")
    dim, heads, kv_heads, head_dim = H * D, H, 2, D

    def linear(n_out: int) -> nn.Linear:
        return nn.Linear(dim, n_out, bias=False)

    return modules.MultiHeadAttention(
        embed_dim=dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, q_proj=linear(heads * head_dim),
        k_proj=linear(kv_heads * head_dim), v_proj=linear(kv_heads * head_dim), output_proj=nn.Linear(dim, dim),
        pos_embeddings=modules.RotaryPositionalEmbeddings(head_dim, max_seq_len=64), max_seq_len=64, is_causal=True,
    )  # fmt: skip


def _compiled(model: nn.Module) -> tuple[Callable[..., Tensor], TilefuseBackend]:
    """model with every parameter perturbed (a dropped weight or bias shows), compiled with tilefuse (strict)."""
    torch._dynamo.reset()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    backend = TilefuseBackend(Options(inner="eager", strict=True))
    return torch.compile(model, backend=backend), backend


def _fused_attention_sites(backend: TilefuseBackend) -> int:
    return sum(s.kind == "attention" and s.status == "fused" for s in backend.report.sites)


def test_view_after_transpose_compiles_fused() -> None:
    """Forward and backward equal eager's: the output projection's grad reaches the op in [B, N, H, D] layout."""
    torch.manual_seed(0)
    model = _TorchtuneStyleAttention()
    compiled, backend = _compiled(model)
    x = _randn(B, N, H * D)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(ours), model(theirs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _fused_attention_sites(backend) == 1, backend.report.sites
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # importing torchtune (and torchao) takes ~20 s unless another test already did
@torch.no_grad()
def test_torchtune_multi_head_attention_compiles_fused() -> None:
    model = _torchtune_mha()
    compiled, backend = _compiled(model)
    x = _randn(B, N, H * D)
    torch.testing.assert_close(compiled(x, x), model(x, x), atol=1e-5, rtol=1e-5)  # self-attention: y = x
    assert _fused_attention_sites(backend) == 1, backend.report.sites


# ---------------------------------------------------------------------------------------------- Triton launchers
@pytest.mark.parametrize(("q_len", "kv_len"), [(N, 40), (2, 256)], ids=["fa2", "decode"])
def test_triton_launchers_write_the_order_asked(q_len: int, kv_len: int) -> None:
    """The FA2 forward and the split-KV decode kernels write the output through its strides, in `out_order`; the
    backward kernels read that output, and a grad in any layout, through theirs."""
    from tilefuse.codegen import reference as ref
    from tilefuse.codegen.attention_bwd import attention_backward_triton
    from tilefuse.codegen.attention_decode import attention_triton, use_decode

    assert use_decode(q_len, kv_len, 1, D) == (q_len == 2)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, n, H, D, generator=gen).transpose(1, 2) for n in (q_len, kv_len, kv_len))
    inputs, flags = ref.AttnInputs(q, k, v), ref.AttnFlags(D**-0.5, causal=q_len > 2)
    out, lse = attention_triton(inputs, flags, out_order=BNHD)
    assert dim_order(out) == BNHD, out.stride()
    torch.testing.assert_close(out, ref.attention_forward(inputs, flags), atol=1e-4, rtol=1e-4)
    if q_len > 2:
        grad = torch.randn(B, H, D, q_len, generator=gen).transpose(-1, -2)  # yet another layout
        got = attention_backward_triton(grad, inputs, flags, out, lse)
        for a, e in zip(got, ref.attention_backward(grad, inputs, flags), strict=True):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_triton_rope_writes_the_order_asked() -> None:
    """The RoPE kernel runs on rows taken in `out_order`, so its contiguous output is that layout, uncopied."""
    from tilefuse.codegen import gpu
    from tilefuse.codegen import reference as ref

    x, cos, sin = _heads(_randn(B, N, H * D)), *_TABLES
    out = gpu.rope(x, cos, sin, 0, D, out_order=BNHD)
    assert dim_order(out) == BNHD, out.stride()
    torch.testing.assert_close(out, ref.rope_forward(x, cos, sin, 0, D), atol=1e-5, rtol=1e-5)
