"""Fusion on models from other libraries: every attention, norm and RoPE site, fused or declined, against a count.

Issue 16's survey, measured on CPU: tiny configurations (random weights, perturbed so that a dropped weight or
bias shows) of diffusers (DiT, Flux, SD3's MMDiT, UNet2DCondition, AutoencoderKL, the Wan, CogVideoX and LTX video
transformers; DiT and the UNet also with the classic `baddbmm` attention processor), torchtune (Llama 3 / 3.1,
Qwen2, Phi-3, Gemma 2, T5 encoder) and x-transformers (TransformerWrapper with its attention and norm options),
one or two layers each, built in code with no download. For each model: the number of sites of each kind it
holds, counted from the model itself in an eager run (`expected_sites`); the sites tilefuse's report lists as fused
or declined (with reasons) against it; fallbacks and exceptions; the largest output difference from eager (and
gradient difference for a training step where the case asks for one); the tilefuse ops that executed
(torch.profiler); `problems`: everything short of the intended outcome.

    python -m tilefuse.benchmarks.ecosystem [--only NAME ...] [--out benchmarks/results/cpu/ecosystem.json]

The libraries are optional (the `zoo` extra); a case whose library is missing is recorded as unavailable.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from tilefuse.benchmarks.harness import EXECUTED_OPS, executed_ops, grad_diff, output_tensors, perturbed, weighted_loss
from tilefuse.compiler.backend import TilefuseBackend
from tilefuse.compiler.options import Options

Row = dict[str, Any]
Built = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]

KINDS = ("attention", "rmsnorm", "layernorm", "rope")

# ------------------------------------------------------------------------------------------- counting the sites

# Module classes (by "module.qualname", matched along the MRO so subclasses count) whose every call is one site of
# the kind. Wrappers that only hold one of these (diffusers' AdaLayerNorm*, x-transformers' LayerNorm around an
# nn.LayerNorm, torchtune's Gemma2FinalNorm) are not listed: the innermost module is the site.
ATTENTION_CLASSES = frozenset({
    "diffusers.models.attention_processor.Attention",
    "diffusers.models.attention.AttentionModuleMixin",  # Flux, Wan, LTX... attention modules
    "torchtune.modules.attention.MultiHeadAttention",
    "torchtune.models.gemma2._attention.Gemma2Attention",
    "torchtune.models.t5._encoder.T5EncoderSelfAttention",
    "x_transformers.x_transformers.Attention",
})  # fmt: skip
RMSNORM_CLASSES = frozenset({
    "torch.nn.modules.normalization.RMSNorm",
    "diffusers.models.normalization.RMSNorm",
    "torchtune.modules.rms_norm.RMSNorm",
    "torchtune.models.gemma.rms_norm.GemmaRMSNorm",  # x * (1 + w)
    "x_transformers.x_transformers.RMSNorm",  # F.normalize(x) * sqrt(d) * g
    "x_transformers.x_transformers.SimpleRMSNorm",  # F.normalize(x) * sqrt(d)
    "x_transformers.x_transformers.ScaleNorm",  # F.normalize(x) * sqrt(d) * scalar g
})  # fmt: skip
LAYERNORM_CLASSES = frozenset({"torch.nn.modules.normalization.LayerNorm"})  # diffusers' FP32LayerNorm, torchtune's too
# One call of these RoPE modules rotates one tensor (q or k): one site.
ROPE_CLASSES = frozenset({
    "torchtune.modules.position_embeddings.RotaryPositionalEmbeddings",
    "torchtune.models.qwen2._positional_embeddings.Qwen2RotaryPositionalEmbeddings",
    "torchtune.models.phi3._position_embeddings.Phi3RotaryPositionalEmbeddings",
    "torchtune.models.llama3_1._position_embeddings.Llama3ScaledRoPE",
})  # fmt: skip
# An attention call that receives a rotary table under one of these names rotates q and k: two sites.
ROTARY_ARGUMENTS = ("image_rotary_emb", "rotary_emb", "rotary_pos_emb")


def _class_kind(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        name = f"{cls.__module__}.{cls.__qualname__}"
        for kind, names in (("attention", ATTENTION_CLASSES), ("rmsnorm", RMSNORM_CLASSES),
                            ("layernorm", LAYERNORM_CLASSES), ("rope", ROPE_CLASSES)):  # fmt: skip
            if name in names:
                return kind
    return None


def _receives_rotary(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    flat = dict(bound)
    for value in bound.values():  # diffusers' Attention.forward passes the processor's extras as **kwargs
        if isinstance(value, dict):
            flat.update(value)
    return any(flat.get(name) is not None for name in ROTARY_ARGUMENTS)


class _L2Norms(TorchFunctionMode):
    """Counts F.normalize calls (an L2 norm over the last axis) made outside any counted norm module."""

    def __init__(self, inside_norm: Callable[[], bool]) -> None:
        super().__init__()
        self.inside_norm = inside_norm
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.normalize and not self.inside_norm():
            self.count += 1
        return func(*args, **(kwargs or {}))


def expected_sites(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Counter[str]:
    """The sites of each kind the model holds, counted from the model itself in one eager forward.

    - attention: one per call of an attention module (`ATTENTION_CLASSES`: diffusers' Attention and every
      AttentionModuleMixin, torchtune's MultiHeadAttention/Gemma2Attention/T5EncoderSelfAttention, x-transformers'
      Attention); each computes one softmax(q·kᵀ)·v.
    - rmsnorm / layernorm: one per call of a norm module (`RMSNORM_CLASSES`, `LAYERNORM_CLASSES` and their
      subclasses), innermost only: a norm module whose call runs another counted norm module is not counted, its
      inner one is. Plus one rmsnorm per `F.normalize` call outside any norm module (x-transformers' L2 QK-norm:
      an RMS norm whose scale is 1/√d). GroupNorm (UNet/VAE) is neither and is not counted.
    - rope: one per call of a torchtune RoPE module (each rotates q or k), and two per attention call that receives
      a rotary table (`ROTARY_ARGUMENTS`: diffusers' `image_rotary_emb`/`rotary_emb`, x-transformers'
      `rotary_pos_emb`), which rotates its q and its k.
    """
    counts: Counter[str] = Counter()
    stack: list[list[Any]] = []  # [kind, saw_inner_norm] per open counted module
    handles = []

    def pre(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        kind = _class_kind(module)
        if kind == "attention" and _receives_rotary(module, args, kw):
            counts["rope"] += 2
        stack.append([kind, False])

    def post(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any], out: Any) -> None:
        kind, saw_inner_norm = stack.pop()
        is_norm = kind in ("rmsnorm", "layernorm")
        if kind is not None and not (is_norm and saw_inner_norm):
            counts[kind] += 1
        if is_norm:
            for frame in stack:
                frame[1] = True

    for module in model.modules():
        if _class_kind(module) is not None:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
    l2 = _L2Norms(lambda: any(frame[0] in ("rmsnorm", "layernorm") for frame in stack))
    try:
        with torch.no_grad(), l2:
            model(*inputs, **(kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    counts["rmsnorm"] += l2.count
    return Counter({kind: counts[kind] for kind in KINDS})


# ------------------------------------------------------------------------------------------------ the models


@dataclass(frozen=True)
class Case:
    """One model: `build()` returns it (eval mode, perturbed), its positional inputs and keyword inputs."""

    name: str
    library: str
    build: Callable[[], Built]
    train: bool = False  # also run a training step and compare gradients
    note: str = ""


def _ready(model: Any) -> nn.Module:
    return perturbed(model.float()).eval()


def _randn(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# diffusers --------------------------------------------------------------------------------------------------


def dit() -> Built:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=1, norm_num_groups=4, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=10)  # fmt: skip
    return (
        _ready(model),
        (_randn(2, 4, 8, 8),),
        {"timestep": torch.tensor([1, 5]), "class_labels": torch.tensor([0, 3])},
    )


def dit_classic() -> Built:
    """DiT with diffusers' classic processor (`AttnProcessor`, what it used before SDPA): scores by
    `torch.baddbmm(empty, q, kᵀ, beta=0, alpha=scale)`, softmax, `torch.bmm` with V, heads folded into the batch."""
    return _classic(*dit())


def _classic(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Built:
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    return model, inputs, kwargs


def flux() -> Built:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))  # fmt: skip
    h, w, text = 4, 4, 8
    img_ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1
    )
    return (
        _ready(model),
        (_randn(1, h * w, 4),),
        {
            "encoder_hidden_states": _randn(1, text, 32, seed=2),
            "pooled_projections": _randn(1, 32, seed=3),
            "timestep": torch.tensor([0.5]),
            "img_ids": img_ids.reshape(-1, 3).float(),
            "txt_ids": torch.zeros(text, 3),
        },
    )


def sd3() -> Built:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
                                  dual_attention_layers=(0,), qk_norm="rms_norm")  # fmt: skip
    return (
        _ready(model),
        (_randn(1, 4, 8, 8),),
        {
            "encoder_hidden_states": _randn(1, 6, 16, seed=2),
            "pooled_projections": _randn(1, 16, seed=3),
            "timestep": torch.tensor([3]),
        },
    )


def unet() -> Built:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                 attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))  # fmt: skip
    return _ready(model), (_randn(1, 4, 8, 8), torch.tensor([3])), {"encoder_hidden_states": _randn(1, 6, 16, seed=2)}


def unet_classic() -> Built:
    """The same UNet with diffusers' classic processor (see `dit_classic`)."""
    return _classic(*unet())


def vae() -> Built:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                          latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)  # fmt: skip
    return _ready(model), (_randn(1, 3, 16, 16),), {"sample_posterior": False}


def wan() -> Built:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                  rope_max_seq_len=32)  # fmt: skip
    return _ready(model), (_randn(1, 4, 2, 4, 4),), {
        "timestep": torch.tensor([3]), "encoder_hidden_states": _randn(1, 6, 16, seed=2)}  # fmt: skip


def cogvideox() -> Built:
    """CogVideoX with 3-D RoPE, applied only to the video tokens of the joint sequence (`query[:, :, text:]`)."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=16, num_layers=1, sample_width=4,
                                        sample_height=4, sample_frames=5, patch_size=2, max_text_seq_length=6,
                                        use_rotary_positional_embeddings=True)  # fmt: skip
    frames, grid = 2, 2  # latent frames (5 - 1) / 4 + 1; 4 / patch 2
    rotary = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (grid, grid)), grid_size=(grid, grid),
                                     temporal_size=frames)  # fmt: skip
    return _ready(model), (_randn(1, frames, 4, 4, 4),), {
        "encoder_hidden_states": _randn(1, 6, 16, seed=2), "timestep": torch.tensor([3]),
        "image_rotary_emb": rotary}  # fmt: skip


def ltx() -> Built:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                       num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                       num_layers=1, caption_channels=16)  # fmt: skip
    frames, height, width = 2, 2, 4
    return _ready(model), (_randn(1, frames * height * width, 4),), {
        "encoder_hidden_states": _randn(1, 6, 16, seed=2), "timestep": torch.tensor([3]),
        "encoder_attention_mask": torch.ones(1, 6), "num_frames": frames, "height": height, "width": width}  # fmt: skip


# torchtune ---------------------------------------------------------------------------------------------------

_TT = {"vocab_size": 64, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 32, "max_seq_len": 32}


def _tokens(batch: int = 2, seq: int = 16) -> Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(1))


def _torchtune(family: str, train: bool = False, **options: Any) -> Case:
    """A torchtune decoder from its component builder `torchtune.models.<family>._component_builders.<family>`."""

    def build() -> Built:
        import importlib

        builder = getattr(importlib.import_module(f"torchtune.models.{family}._component_builders"), family)
        torch.manual_seed(0)
        return _ready(builder(**_TT, intermediate_dim=64, **options)), (_tokens(),), {}

    return Case(f"torchtune:{family}", "torchtune", build, train=train)


def torchtune_t5_encoder() -> Built:
    from torchtune.models.t5._component_builders import t5_encoder

    torch.manual_seed(0)
    model = t5_encoder(embed_dim=32, mlp_dim=64, num_heads=4, head_dim=8, num_layers=1, rel_pos_num_buckets=8,
                       rel_pos_max_dist=16, vocab_size=64, norm_eps=1e-6, max_seq_len=16)  # fmt: skip
    return _ready(model), (_tokens(),), {}  # its relative-position bias is built for max_seq_len tokens


# x-transformers -----------------------------------------------------------------------------------------------


def _x_transformer(layers: str = "Decoder", **options: Any) -> Built:
    import x_transformers
    from loguru import logger

    logger.disable("x_transformers")  # its advice on rotary dimensions for full-size language models
    torch.manual_seed(0)
    attn_layers = getattr(x_transformers, layers)(dim=32, depth=1, heads=4, attn_dim_head=8, **options)
    model = x_transformers.TransformerWrapper(num_tokens=64, max_seq_len=32, attn_layers=attn_layers)
    return _ready(model), (_tokens(),), {}


def _xt(name: str, layers: str = "Decoder", train: bool = False, **options: Any) -> Case:
    return Case(f"x-transformers:{name}", "x-transformers", lambda: _x_transformer(layers, **options), train=train)


CASES: dict[str, Case] = {
    case.name: case
    for case in [
        Case("diffusers:DiT", "diffusers", dit, train=True),
        Case("diffusers:DiT-classic-processor", "diffusers", dit_classic),
        Case("diffusers:Flux", "diffusers", flux),
        Case("diffusers:SD3", "diffusers", sd3),
        Case("diffusers:UNet2DCondition", "diffusers", unet),
        Case("diffusers:UNet2DCondition-classic-processor", "diffusers", unet_classic),
        Case("diffusers:AutoencoderKL", "diffusers", vae),
        Case("diffusers:Wan", "diffusers", wan),
        Case("diffusers:CogVideoX", "diffusers", cogvideox),
        Case("diffusers:LTXVideo", "diffusers", ltx),
        _torchtune("llama3", train=True),
        _torchtune("llama3_1"),
        _torchtune("qwen2"),
        _torchtune("phi3"),
        _torchtune("gemma2", head_dim=8, sliding_window_size=8),
        Case("torchtune:t5_encoder", "torchtune", torchtune_t5_encoder),
        _xt("decoder-rotary-flash", rotary_pos_emb=True, attn_flash=True, train=True),
        _xt("decoder-rotary", rotary_pos_emb=True),
        _xt("encoder-layernorm", "Encoder"),
        _xt("decoder-alibi", alibi_pos_bias=True, alibi_num_heads=2),
        _xt("decoder-qk-norm", attn_qk_norm=True, attn_flash=True),
        _xt("decoder-one-kv-head", attn_one_kv_head=True, rotary_pos_emb=True),
        _xt("decoder-kv-heads-flash", attn_kv_heads=2, attn_flash=True),
        _xt("decoder-rmsnorm", use_rmsnorm=True, attn_flash=True),
        _xt("decoder-simple-rmsnorm", use_simple_rmsnorm=True),
        _xt("decoder-scalenorm", use_scalenorm=True),
        _xt("decoder-sliding-window", attn_max_attend_past=4, rotary_pos_emb=True),
        # several options at once, for the test suite (tests/test_zoo_models.py): one model, one compile
        _xt(
            "decoder-mqa-qk-norm-rmsnorm",
            attn_one_kv_head=True,
            attn_qk_norm=True,
            use_rmsnorm=True,
            rotary_pos_emb=True,
        ),
    ]
}

# ---------------------------------------------------------------------------------------------------- measuring


def _max_diff(got: list[Tensor], expected: list[Tensor]) -> float:
    if len(got) != len(expected) or any(a.shape != e.shape for a, e in zip(got, expected, strict=False)):
        return math.inf
    return max((float((a.detach().double() - e.detach().double()).abs().max()) for a, e in
                zip(got, expected, strict=True)), default=0.0)  # fmt: skip


def _scale(values: list[Tensor]) -> float:
    return max((float(v.detach().abs().max()) for v in values), default=0.0)


def _sites(backend: TilefuseBackend, expected: Counter[str]) -> dict[str, Row]:
    """Per kind: the sites the model holds (expected), those the report lists (found), fused, declined by reason."""
    out: dict[str, Row] = {}
    for kind in KINDS:
        sites = [s for s in backend.report.sites if s.kind == kind]
        fused = sum(s.status == "fused" for s in sites)
        reasons = Counter(str(s.reason) for s in sites if s.status == "declined")
        out[kind] = {
            "expected": expected[kind],
            "found": len(sites),
            "fused": fused,
            "declined": dict(reasons),
        }
    specs = [s.spec for s in backend.report.by_kind("attention") if s.status == "fused" and s.spec is not None]
    out["attention"]["how"] = dict(Counter(_how(spec) for spec in specs))
    return out


def _how(spec: Any) -> str:
    """How a fused attention site carries its mask, positions and heads, e.g. "causal window=4 rope gqa=4"."""
    parts = [name for name in ("causal", "alibi", "sinks") if getattr(spec, name, False)]
    parts += [f"window={spec.window}"] if getattr(spec, "window", None) is not None else []
    parts += [f"softcap={spec.softcap}"] if getattr(spec, "softcap", None) is not None else []
    parts += [f"mask={spec.mask}"] if getattr(spec, "mask", "none") != "none" else []
    parts += ["rope"] if getattr(spec, "rope", None) is not None else []
    parts += [f"gqa={spec.gqa_group}"] if getattr(spec, "gqa_group", 1) != 1 else []
    return " ".join(parts) or "plain"


@contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("tilefuse")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def inference(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[TilefuseBackend, Row]:
    """Compile with tilefuse, run twice without grad (the second call profiled); compare with eager."""
    torch._dynamo.reset()
    backend = TilefuseBackend(Options(inner="eager"))
    compiled = torch.compile(model, backend=backend)
    row: Row = {}
    with torch.no_grad():
        expected = output_tensors(model(*inputs, **kwargs))
        start = time.perf_counter()
        got = output_tensors(compiled(*inputs, **kwargs))
        row["compile_s"] = round(time.perf_counter() - start, 2)
        _, ops = executed_ops(lambda: compiled(*inputs, **kwargs))
    row.update(out_diff=_max_diff(got, expected), out_scale=_scale(expected), executed=dict(ops))
    return backend, row


def training(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[TilefuseBackend, Row]:
    """One forward and backward of a twin compiled with tilefuse against eager, then a second one profiled.

    Both stay in eval mode: dropout (DiT's label dropout among it) would draw different random numbers on each
    side; gradients flow all the same."""
    torch._dynamo.reset()
    eager, ours = copy.deepcopy(model), copy.deepcopy(model)
    backend = TilefuseBackend(Options(inner="eager"))
    compiled = torch.compile(ours, backend=backend)
    expected = output_tensors(eager(*inputs, **kwargs))
    weighted_loss(expected).backward()
    got = output_tensors(compiled(*inputs, **kwargs))
    weighted_loss(got).backward()
    worst, scale = grad_diff(ours, eager)
    _, ops = executed_ops(lambda: weighted_loss(output_tensors(compiled(*inputs, **kwargs))).backward())
    return backend, {"out_diff": _max_diff(got, expected), "out_scale": _scale(expected), "grad_diff": worst,
                     "grad_scale": scale, "executed": dict(ops)}  # fmt: skip


def _without_tilefuse(fn: Callable[[], Any]) -> str:
    """Whether the same run crashes with torch's own aot_eager backend (tilefuse's inner compiler) too."""
    torch._dynamo.reset()
    try:
        fn()
    except Exception as err:
        return f"{type(err).__name__}: {str(err)[:200]}"
    return "ok"


def _attempt(fn: Callable[[], tuple[TilefuseBackend, Row]], control: Callable[[], Any], expected: Counter[str]) -> Row:
    try:
        backend, row = fn()
    except Exception as err:  # a crash is a result too
        return {"error": f"{type(err).__name__}: {str(err)[:400]}", "aot_eager_alone": _without_tilefuse(control)}
    row["sites"] = _sites(backend, expected)
    row["fallbacks"] = [str(f)[:400] for f in backend.report.fallbacks]
    row["graphs"] = backend.report.graphs
    return row


def measure(case: Case) -> Row:
    """Build the case, count its sites, and measure inference (and a training step if the case asks)."""
    try:
        model, inputs, kwargs = case.build()
        expected = expected_sites(model, inputs, kwargs)
    except ImportError as err:
        return {"library": case.library, "unavailable": str(err)}
    row: Row = {"library": case.library, "expected": dict(expected)}

    def control() -> Any:
        with torch.no_grad():
            return torch.compile(model, backend="aot_eager")(*inputs, **kwargs)

    start = time.perf_counter()
    with _quiet():
        row["inference"] = _attempt(lambda: inference(model, inputs, kwargs), control, expected)
        if case.train:
            row["training"] = _attempt(lambda: training(model, inputs, kwargs), control, expected)
    for mode in ("inference", "training"):
        if mode in row:
            row[mode]["problems"] = problems(row[mode])
    row["wall_s"] = round(time.perf_counter() - start, 2)
    return row


# ------------------------------------------------------------------------------------------------------ verdict

# Decline reasons that are true for a site of these models (regular expressions, per kind): a site declined for
# any other reason is a miss. Empty: every counted site of these models is one softmax attention, one norm or one
# rotation that the fused ops compute exactly.
TRUE_DECLINES: dict[str, tuple[str, ...]] = {kind: () for kind in KINDS}
OUT_RTOL, OUT_ATOL = 1e-4, 1e-5  # of the largest |output| (fp32, CPU reference implementations)
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # of the largest |gradient|


def _true_decline(kind: str, reason: str) -> bool:
    return any(re.search(pattern, reason) for pattern in TRUE_DECLINES[kind])


def problems(run: Row) -> list[str]:
    """Everything that falls short of the intended outcome in one run (inference or training) of a model: a crash
    or fallback, sites of a kind neither fused nor truly declined, more sites listed than the model holds, a site
    declined for a reason not in TRUE_DECLINES, a fused kind whose op never ran, outputs or gradients off eager."""
    if "error" in run:
        return [f"crash: {run['error']} (torch's aot_eager alone: {run['aot_eager_alone']})"]
    found = [f"fallback: {why}" for why in run["fallbacks"]]
    for kind, site in run["sites"].items():
        found += _site_problems(kind, site, run["executed"])
    if not run["out_diff"] <= OUT_ATOL + OUT_RTOL * run["out_scale"]:
        found.append(f"output differs from eager by {run['out_diff']:.2e} (largest |output| {run['out_scale']:.2e})")
    if "grad_diff" in run and not run["grad_diff"] <= GRAD_ATOL + GRAD_RTOL * run["grad_scale"]:
        found.append(f"gradients differ from eager by {run['grad_diff']:.2e} (largest {run['grad_scale']:.2e})")
    return found


def _site_problems(kind: str, site: Row, executed: dict[str, int]) -> list[str]:
    """One kind's sites against the model's count. Each comparison stands alone: the model's sites must all be
    fused (or truly declined), and the report may list no more than the model holds, so a declined look-alike
    cannot stand in for a missed site. A wrongly fused look-alike still could: the report names a site by its graph
    node only, with no module path to match it against the model's sites."""
    wrong = [(reason, n) for reason, n in site["declined"].items() if not _true_decline(kind, reason)]
    accounted = site["fused"] + sum(site["declined"].values()) - sum(n for _, n in wrong)
    out = []
    if accounted < site["expected"]:
        out.append(f"{kind}: {site['expected'] - accounted} of {site['expected']} sites neither fused nor truly "
                   f"declined ({site['found']} in the report)")  # fmt: skip
    if site["found"] > site["expected"]:
        out.append(f"{kind}: the report lists {site['found']} sites, the model holds {site['expected']}")
    out += [f"{kind}: {n} declined: {reason}" for reason, n in wrong]
    if site["fused"] and not any(executed.get(op) for op in EXECUTED_OPS[kind]):
        out.append(f"{kind}: {site['fused']} fused, but no {'/'.join(EXECUTED_OPS[kind])} executed")
    return out


# ---------------------------------------------------------------------------------------------------- reporting


def _row_totals(row: Row) -> Counter[str]:
    """One model's counts: per kind expected and fused (inference), models that crashed or fell back (inference or
    training) and models with any problem."""
    totals: Counter[str] = Counter()
    run = row["inference"]
    for kind, count in row["expected"].items():
        group = "norm" if kind in ("rmsnorm", "layernorm") else kind
        totals[f"{group}_expected"] += count
        totals[f"{group}_fused"] += run.get("sites", {}).get(kind, {}).get("fused", 0)
    runs = [r for r in (row["inference"], row.get("training")) if r is not None]
    totals["crashes"] += any("error" in r or r["fallbacks"] for r in runs)
    totals["models"] += 1
    totals["models_ok"] += not any(r["problems"] for r in runs)
    return totals


def summarize(results: dict[str, Row]) -> dict[str, Row]:
    """Per library: attention, norms and RoPE fused/expected; models that crashed or fell back; models with no
    problem (`problems`) out of all."""
    summary: dict[str, Counter[str]] = {}
    for row in results.values():
        if "expected" in row:
            summary.setdefault(row["library"], Counter()).update(_row_totals(row))
    every: Counter[str] = Counter()
    for totals in summary.values():
        every.update(totals)
    summary["all"] = every
    return {
        library: {
            **{group: f"{t[group + '_fused']}/{t[group + '_expected']}" for group in ("attention", "norm", "rope")},
            "crashes": t["crashes"],
            "models_ok": f"{t['models_ok']}/{t['models']}",
        }
        for library, t in summary.items()
    }


def _line(name: str, row: Row) -> str:
    if "unavailable" in row:
        return f"{name:46s} unavailable: {row['unavailable']}"
    run = row["inference"]
    if "error" in run:
        return f"{name:46s} CRASH {run['error'][:120]} (aot_eager alone: {run['aot_eager_alone'][:60]})"
    cells = "  ".join(f"{k[:4]} {run['sites'][k]['fused']}/{row['expected'][k]}" for k in KINDS)
    issues = run["problems"] + row.get("training", {}).get("problems", [])
    return f"{name:46s} {cells}  {row['wall_s']:5.1f}s  " + ("ok" if not issues else "; ".join(issues)[:240])


def run(names: list[str]) -> dict[str, Row]:
    results: dict[str, Row] = {}
    for name in names:
        results[name] = measure(CASES[name])
        print(_line(name, results[name]), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="run only these models")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    import tilefuse

    print(f"tilefuse from {tilefuse.__file__}", flush=True)
    results = run(args.only or list(CASES))
    summary = summarize(results)
    print(f"\n{'library':16s} {'attention':>10s} {'norms':>10s} {'rope':>10s} {'crashes':>8s} {'models ok':>10s}")
    for library, s in summary.items():
        print(
            f"{library:16s} {s['attention']:>10s} {s['norm']:>10s} {s['rope']:>10s} {s['crashes']:>8d} "
            f"{s['models_ok']:>10s}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        env: dict[str, str | None] = {"torch": torch.__version__, "tilefuse": str(Path(tilefuse.__file__).parent)}
        for lib in ("diffusers", "torchtune", "torchao", "x-transformers", "transformers"):
            try:
                env[lib] = metadata.version(lib)
            except metadata.PackageNotFoundError:
                env[lib] = None
        args.out.write_text(json.dumps({"env": env, "summary": summary, "models": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
