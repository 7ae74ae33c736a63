"""End to end on a Llama-style transformers model (~1B parameters, bf16 on GPU; a tiny fp32 one on CPU):
training step (forward, loss, backward, AdamW step) and prefill, torch.compile(backend="tilefuse") vs
torch.compile default vs eager: tokens/s, and peak memory on CUDA.

All contenders share one set of weights; the optimizer runs with lr=0 so the weights, and with them the outputs
checked against the reference, stay the same across contenders.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tilefuse

from .harness import Case, Contender, Context, Record, run_case
from .models import ONE_B, TINY, LlamaShape, llama, parameter_count, token_ids, transformers_missing

NAME = "e2e"
METRIC = "tokens_per_s"
X_AXIS = "seq"
CONTENDERS = ("tilefuse", "inductor", "eager")
TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.05, torch.float32: 1e-3}
log = logging.getLogger("tilefuse.benchmarks")


class LossModel(nn.Module):
    """ids, labels -> mean next-token cross-entropy (fp32), so the loss is compiled together with the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        logits = self.model(ids)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def _setup(ctx: Context) -> tuple[LlamaShape, torch.dtype, int, int]:
    if ctx.tiny:
        return TINY, torch.float32, 2, 64
    return ONE_B, torch.bfloat16, 2, 2048


def _compilers(ctx: Context) -> dict[str, Callable[[nn.Module], Any]]:
    return {
        "tilefuse": lambda m: tilefuse.compile(m, inner=ctx.inner),
        "inductor": lambda m: torch.compile(m),
        "eager": lambda m: m,
    }


def _probes(model: nn.Module) -> list[Tensor]:
    """Gradients checked against the reference: the last norm's and the LM head's (stable in bf16)."""
    loss_model: Any = model
    hf = loss_model.model.model  # LossModel -> Logits -> LlamaForCausalLM
    return [hf.model.norm.weight, hf.lm_head.weight]


def train_case(model: nn.Module, ids: Tensor, ctx: Context, dtype: torch.dtype, work: dict[str, float]) -> Case:
    loss_model = LossModel(model)
    labels = torch.roll(ids, -1, dims=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    ct = torch.float64 if ctx.device.type == "cpu" else torch.float32
    ref_model = LossModel(copy.deepcopy(model).to(ct))

    def gradients(fn: Callable[..., Tensor], m: nn.Module) -> tuple[Tensor, ...]:
        loss = fn(ids, labels)
        return (loss.detach().reshape(1), *torch.autograd.grad(loss, _probes(m)))

    def build(compile_fn: Callable[[nn.Module], Any]) -> Contender:
        fn = compile_fn(loss_model)

        def step() -> None:
            fn(ids, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Contender(run=step, check=lambda: gradients(fn, loss_model))

    return Case(
        name=f"train {ids.shape[0]}x{ids.shape[1]}",
        params={"mode": "train", "batch": ids.shape[0], "seq": ids.shape[1], "dtype": str(dtype)},
        reference=lambda: gradients(ref_model, ref_model),
        contenders={n: partial(build, f) for n, f in _compilers(ctx).items()},
        tolerance=TOLERANCE[dtype],
        work=work,
    )


def prefill_case(model: nn.Module, ids: Tensor, ctx: Context, dtype: torch.dtype, work: dict[str, float]) -> Case:
    ct = torch.float64 if ctx.device.type == "cpu" else torch.float32
    ref_model = copy.deepcopy(model).to(ct)

    def build(compile_fn: Callable[[nn.Module], Any]) -> Callable[[], Tensor]:
        fn = compile_fn(model)

        def prefill() -> Tensor:
            with torch.no_grad():
                out: Tensor = fn(ids)
            return out

        return prefill

    def reference() -> Tensor:
        with torch.no_grad():
            out: Tensor = ref_model(ids)
        return out

    return Case(
        name=f"prefill {ids.shape[0]}x{ids.shape[1]}",
        params={"mode": "prefill", "batch": ids.shape[0], "seq": ids.shape[1], "dtype": str(dtype)},
        reference=reference,
        contenders={n: partial(build, f) for n, f in _compilers(ctx).items()},
        tolerance=TOLERANCE[dtype],
        work=work,
    )


def run(ctx: Context) -> list[Record]:
    if missing := transformers_missing():
        return [Record(NAME, "e2e", {}, name, "unavailable", missing) for name in CONTENDERS]
    shape, dtype, batch, seq = _setup(ctx)
    records: list[Record] = []
    for mode, make in (("train", train_case), ("prefill", prefill_case)):
        batch_here = batch if mode == "train" else 2 * batch
        name = f"{mode} {batch_here}x{seq}"
        if not ctx.selected(name):
            continue
        log.info("e2e: %s", name)
        model = llama(shape, attn="sdpa", seq=seq).to(ctx.device, dtype)
        model.train(mode == "train")
        ids = token_ids(shape, batch_here, seq, ctx.device)
        work = {"tokens": float(batch_here * seq)}
        case_records = run_case(NAME, make(model, ids, ctx, dtype, work), ctx)
        for record in case_records:
            record.params |= {**shape.params(), "parameters": parameter_count(model), "inner": ctx.inner}
        records += case_records
        del model
    return records
