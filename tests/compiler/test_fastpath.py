"""PyTorch's fast paths through the backend (passes/fastpath.py).

In eval mode without grad, nn.TransformerEncoderLayer runs one opaque op per layer
(`aten._transformer_encoder_layer_fwd`); capture decomposes it so its attention and layer norms fuse. Each test
checks the report, that the fused ops really run (profiler) and the op they replace does not, and the numerics
against eager's fast path (fp64 golden: err(ours) <= 2·err(eager) + floor).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import tilefuse
from tilefuse.compiler.options import Options
from tilefuse.passes.advice import forget_advice
from tilefuse.passes.fastpath import native_multi_head_attention

D_MODEL, HEADS, FFN, BATCH, SEQ = 32, 4, 64, 3, 8
FAST_PATH_OP = "aten::_transformer_encoder_layer_fwd"


@pytest.fixture(autouse=True)
def _fresh() -> None:
    torch._dynamo.reset()
    forget_advice()


def _encoder(
    norm_first: bool, activation: str, nested: bool = True, dropout: float = 0.1, layers: int = 2
) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        D_MODEL, HEADS, FFN, dropout=dropout, activation=activation, batch_first=True, norm_first=norm_first
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested).eval()


def _padding() -> Tensor:
    pad = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 2:] = True
    return pad


def _masks(kind: str) -> dict[str, Any]:
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    if kind == "padding":
        return {"src_key_padding_mask": _padding()}
    if kind == "causal_bool":  # is_causal given: without it the encoder's mask check graph-breaks (Tensor.item)
        return {"mask": causal, "is_causal": True}
    if kind == "float_masks":  # canonical 0/-inf masks, as PyTorch makes from boolean ones
        additive, padding = (torch.zeros(m.shape).masked_fill(m, float("-inf")) for m in (causal, _padding()))
        return {"mask": additive, "src_key_padding_mask": padding, "is_causal": False}
    return {}


def _compile(model: Callable[..., Any], **options: Any) -> tuple[Callable[..., Any], tilefuse.TilefuseBackend]:
    backend = tilefuse.TilefuseBackend(Options.from_any(None, inner="eager", strict=True, **options))
    return torch.compile(model, backend=backend), backend


def _op_counts(fn: Callable[[], Any]) -> Counter[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name.startswith("tilefuse::") or e.name == FAST_PATH_OP)


def _fused(backend: tilefuse.TilefuseBackend) -> Counter[str]:
    return Counter(s.kind for s in backend.report.sites if s.status == "fused")


def _as_double(tensors: dict[str, Any]) -> dict[str, Any]:
    return {k: v.double() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in tensors.items()}


def _check_numerics(ours: Tensor, model: nn.Module, x: Tensor, masks: dict[str, Any], rows: Tensor) -> None:
    """Against eager's fast path in fp32 and an fp64 golden, on the rows that are not padding (eager zeroes
    padding rows when it converts to a nested tensor; torch.compile never does, whatever the backend)."""
    eager = model(x, **masks)
    golden = copy.deepcopy(model).double()(x.double(), **_as_double(masks))
    floor = 4 * torch.finfo(torch.float32).eps * golden.abs().max().item()
    err_ours, err_eager = ((t[rows].double() - golden[rows]).abs().max().item() for t in (ours, eager))
    assert err_ours <= 2 * err_eager + floor, (err_ours, err_eager, floor)


@pytest.mark.parametrize(
    ("norm_first", "activation", "mask_kind"),
    [
        (False, "relu", "padding"),
        (True, "gelu", "causal_bool"),
        (True, "relu", "float_masks"),
    ],
)
def test_encoder_fast_path_fuses(norm_first: bool, activation: str, mask_kind: str) -> None:
    model, masks = _encoder(norm_first, activation), _masks(mask_kind)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=torch.Generator().manual_seed(1))
    compiled, backend = _compile(model)
    with torch.no_grad():
        assert _op_counts(lambda: model(x, **masks))[FAST_PATH_OP] == 2  # eager does take the fast path
        ours = compiled(x, **masks)
        ran = _op_counts(lambda: compiled(x, **masks))
        rows = ~_padding() if "src_key_padding_mask" in masks else torch.ones(BATCH, SEQ, dtype=torch.bool)
        _check_numerics(ours, model, x, masks, rows)
    assert _fused(backend) == {"attention": 2, "layernorm": 4}, backend.report.to_dict()
    assert not any(s.status == "declined" for s in backend.report.sites)
    assert ran["tilefuse::attention"] == 2 and ran[FAST_PATH_OP] == 0, ran
    assert sum(n for name, n in ran.items() if "norm" in name) == 4, ran
    if mask_kind == "padding":
        masked = [s.spec for s in backend.report.by_kind("attention")]
        assert all(spec is not None and spec.to_dict()["mask"] == "key_padding" for spec in masked)


def test_encoder_training_and_eval_fuse_alike() -> None:
    """Training (the slow path, with grad) and eval + no_grad (the fast path) fuse the same sites, and both match
    eager; dropout 0 so that training is deterministic."""
    model, masks = _encoder(False, "gelu", nested=False, dropout=0.0, layers=1), _masks("padding")
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=torch.Generator().manual_seed(2))
    model.train()
    compiled, train_backend = _compile(model)
    ours = compiled(x, **masks)
    ours.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    eager = model(x, **masks)
    eager.sum().backward()
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
    for ours_grad, p in zip(grads, [p for p in model.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(ours_grad, p.grad, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
    model.eval()
    compiled, eval_backend = _compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, **masks), model(x, **masks), atol=1e-5, rtol=1e-5)
    assert _fused(train_backend) == _fused(eval_backend) == {"attention": 1, "layernorm": 2}


def _mha_mask(kind: str) -> tuple[Tensor | None, int | None]:
    gen = torch.Generator().manual_seed(6)
    if kind == "attention":
        return torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), 0
    if kind == "padding":
        return _padding(), 1
    if kind == "merged_float":  # the kernel masks every non-zero entry, -1.5 as much as -inf
        dropped = (torch.rand(BATCH, HEADS, SEQ, SEQ, generator=gen) < 0.3) & ~torch.eye(SEQ, dtype=torch.bool)
        return torch.zeros(dropped.shape).masked_fill(dropped, -1.5), 2
    return None, None


@pytest.mark.parametrize("mask_kind", ["none", "attention", "padding", "merged_float"])
@pytest.mark.parametrize(("need_weights", "average"), [(False, True), (True, True), (True, False)])
def test_decomposition_matches_the_aten_op(mask_kind: str, need_weights: bool, average: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    shapes = [(BATCH, SEQ, D_MODEL), (3 * D_MODEL, D_MODEL), (3 * D_MODEL,), (D_MODEL, D_MODEL), (D_MODEL,)]
    x, w, b, pw, pb = (torch.randn(*s, generator=gen) * 0.3 for s in shapes)
    mask, mask_type = _mha_mask(mask_kind)
    args = (x, x, x, D_MODEL, HEADS, w, b, pw, pb, mask, need_weights, average, mask_type)
    with torch.no_grad():
        expected, ours = torch._native_multi_head_attention(*args), native_multi_head_attention(*args)
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(ours[1], expected[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_type", [0, 1])
def test_native_multi_head_attention_fuses(mask_type: int) -> None:
    """The op nn.MultiheadAttention's eager fast path calls, called directly: [L, S] (mask_type 0) or [B, S]
    (mask_type 1) boolean masks, True = masked."""
    gen = torch.Generator().manual_seed(3)
    x, w, b, pw, pb = (
        torch.randn(*s, generator=gen) * 0.3 for s in [(BATCH, SEQ, D_MODEL), (96, 32), (96,), (32, 32), (32,)]
    )
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1) if mask_type == 0 else _padding()

    def mha(x: Tensor, mask: Tensor) -> Tensor:
        return torch._native_multi_head_attention(x, x, x, D_MODEL, HEADS, w, b, pw, pb, mask, False, True, mask_type)[
            0
        ]

    compiled, backend = _compile(mha)
    with torch.no_grad():
        ours = compiled(x, mask)
        ran = _op_counts(lambda: compiled(x, mask))
        torch.testing.assert_close(ours, mha(x, mask), atol=1e-5, rtol=1e-5)
    assert _fused(backend) == {"attention": 1} and ran["tilefuse::attention"] == 1


def test_multihead_attention_need_weights_advises(caplog: pytest.LogCaptureFixture) -> None:
    """need_weights=True (the default) returns the probabilities: the site stays unfused, with one advice naming
    need_weights=False; with it, the same module fuses."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True).eval()
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=torch.Generator().manual_seed(4))
    compiled, backend = _compile(mha)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="tilefuse"):
        for pad in (_padding(), None):  # two graphs, one warning
            ours, eager = compiled(x, x, x, key_padding_mask=pad), mha(x, x, x, key_padding_mask=pad)
            for a, b in zip(ours, eager, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert [a.key for a in backend.report.advice] == ["attention_weights_returned"]
    assert "need_weights=False" in backend.report.advice[0].fix
    assert sum("need_weights=False" in r.getMessage() for r in caplog.records) == 1
    assert _fused(backend) == {} and len(backend.report.by_kind("attention")) == 2

    torch._dynamo.reset()
    compiled, backend = _compile(mha)
    with torch.no_grad():
        ours = compiled(x, x, x, key_padding_mask=_padding(), need_weights=False)[0]
        torch.testing.assert_close(ours, mha(x, x, x, key_padding_mask=_padding(), need_weights=False)[0])
    assert _fused(backend) == {"attention": 1} and not backend.report.advice


class _Padded(nn.Module):
    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        return self.encoder(x, src_key_padding_mask=pad)


def test_nested_tensor_encoder_is_advised() -> None:
    """enable_nested_tensor with mask_check=False converts to a nested tensor, which Dynamo cannot trace: the
    encoder runs eagerly (correct, unfused) and the report says how to get it fused."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FFN, batch_first=True)
    model = _Padded(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True, mask_check=False).eval())
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=torch.Generator().manual_seed(5))
    report = tilefuse.explain(model, (x, _padding()))
    assert [a.key for a in report.advice] == ["nested_tensor_encoder"]
    assert "enable_nested_tensor=False" in report.advice[0].fix
    assert not report.by_kind("attention")
