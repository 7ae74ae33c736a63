"""What every suite shares: the run context, the case/record types, output checks and timing.

A suite builds `Case`s; `run_case` checks every contender's output against the case's reference first, records a
contender that fails as `check_failed` without timing it, then times the rest side by side in the same process
(CUDA: `triton.testing.do_bench` medians, which warm up and flush L2; CPU: interleaved `perf_counter` rounds), and
derives TFLOP/s, GB/s and the ratio to the best peer from timings of this one run only.
"""

from __future__ import annotations

import gc
import logging
import math
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger("tilefuse.benchmarks")

Outputs = Tensor | tuple[Tensor, ...]
Runner = Callable[[], Any]
SCHEMA_VERSION = 1
STATUSES = ("ok", "check_failed", "unavailable", "error", "oom")

# Allowed max |out - ref| / max |ref| per dtype (attention/norm outputs and gradients; fp32/fp64 contenders
# are checked against an fp64 reference on CPU).
TOLERANCE = {torch.bfloat16: 4e-2, torch.float16: 1e-2, torch.float32: 1e-3, torch.float64: 1e-8}

# The op that carries out a fused site of each kind, to tell from `executed_ops` that it ran: a norm may be fused
# with its residual add, and RoPE on q and k may be absorbed into the attention op.
EXECUTED_OPS: dict[str, tuple[str, ...]] = {
    "attention": ("tilefuse::attention",),
    "rmsnorm": ("tilefuse::rms_norm", "tilefuse::add_rms_norm"),
    "layernorm": ("tilefuse::layer_norm", "tilefuse::add_layer_norm"),
    "rope": ("tilefuse::rope", "tilefuse::attention"),
}


class Unavailable(Exception):
    """A contender that cannot run here (missing package, unsupported feature); the message says why."""


@dataclass(frozen=True)
class Contender:
    """`run` is what gets timed; `check` (default: `run`) produces the outputs compared with the reference, for
    contenders whose timed call mutates state (an optimizer step)."""

    run: Runner
    check: Runner | None = None


@dataclass
class Case:
    """One measured point: its parameters, a high-precision reference and how to build each contender.

    A builder returns a `Runner` or a `Contender`, or raises `Unavailable`. `work` holds the case's useful work
    ("flops", "bytes", "tokens"), from which the records' TFLOP/s, GB/s and tokens/s are derived.
    """

    name: str
    params: dict[str, Any]
    reference: Callable[[], Outputs]
    contenders: Mapping[str, Callable[[], Runner | Contender]]
    tolerance: float
    work: dict[str, float] = field(default_factory=dict)


@dataclass
class Record:
    suite: str
    case: str
    params: dict[str, Any]
    contender: str
    status: str
    reason: str | None = None
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    timing: str | None = None
    max_rel_err: float | None = None
    tolerance: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    best_peer: str | None = None
    speedup_vs_best_peer: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    """How a suite runs: device, size class, timing knobs, which contenders, and the notes it logs."""

    device: torch.device
    tiny: bool = False
    repeats: int = 20  # CPU: interleaved rounds
    warmup_calls: int = 3  # CPU: untimed calls per contender after its check call
    warmup_ms: int = 25  # CUDA: do_bench warm-up and measurement budgets
    rep_ms: int = 100
    cuda_graphs: bool = False
    contenders: frozenset[str] | None = None
    case_filter: str | None = None  # regular expression searched in case names
    inner: str = "inductor"  # inner compiler of the tilefuse contenders in the e2e and compile suites
    notes: list[str] = field(default_factory=list)
    done_cases: frozenset[str] = frozenset()  # cases an earlier, interrupted run already measured (--resume)
    checkpoint: Callable[[list[Record]], object] | None = None  # called with every record so far after each case
    completed: list[Record] = field(default_factory=list)
    profile: str | None = None  # run only this contender, its timed calls inside cudaProfilerStart/Stop (ncu)
    profile_calls: int = 1

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def wants(self, contender: str) -> bool:
        return self.contenders is None or contender in self.contenders

    def selected(self, case: str) -> bool:
        if case in self.done_cases:
            return False
        return self.case_filter is None or re.search(self.case_filter, case) is not None

    def case_done(self, records: list[Record]) -> None:
        """Keep a finished case's records and let the checkpoint write them, so a killed run loses one case."""
        self.completed.extend(records)
        if self.checkpoint is not None:
            self.checkpoint(self.completed)

    def note(self, message: str) -> None:
        if message not in self.notes:
            log.info("%s", message)
            self.notes.append(message)


# --------------------------------------------------------------------------------------------------- checks
def _as_tuple(outputs: Any) -> tuple[Tensor, ...]:
    if isinstance(outputs, Tensor):
        return (outputs,)
    if isinstance(outputs, tuple | list) and all(isinstance(t, Tensor) for t in outputs):
        return tuple(outputs)
    raise TypeError(f"a contender must return a tensor or a tuple of tensors, got {type(outputs).__name__}")


def max_rel_error(got: Any, ref: Any) -> float:
    """max over outputs of max|got - ref| / max|ref|, in the reference's dtype; inf on a shape mismatch or NaN."""
    got_t, ref_t = _as_tuple(got), _as_tuple(ref)
    if len(got_t) != len(ref_t):
        return float("inf")
    worst = 0.0
    for g, r in zip(got_t, ref_t, strict=True):
        if g.shape != r.shape:
            return float("inf")
        r = r.detach()
        diff = (g.detach().to(device=r.device, dtype=r.dtype) - r).abs().max().item() if r.numel() else 0.0
        scale = max(r.abs().max().item() if r.numel() else 0.0, 1e-6)
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / scale)
    return worst


# --------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles_ms(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), cuts[1], cuts[7]


def time_cpu(runners: dict[str, Runner], ctx: Context) -> dict[str, tuple[float, float, float]]:
    """Interleaved rounds: each round calls every runner once, so drift hits every contender alike."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for runner in runners.values():
        for _ in range(ctx.warmup_calls):
            runner()
    for _ in range(max(ctx.repeats, 1)):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _quantiles_ms(values) for name, values in samples.items()}


def time_cuda(runner: Runner, ctx: Context) -> tuple[tuple[float, float, float], str]:
    """do_bench median and 20/80% quantiles (warm-up, L2 flushed before every call); optional CUDA graphs."""
    import triton.testing

    quantiles = [0.5, 0.2, 0.8]
    if ctx.cuda_graphs:
        try:
            q = triton.testing.do_bench_cudagraph(runner, rep=ctx.rep_ms, quantiles=quantiles)
            return (float(q[0]), float(q[1]), float(q[2])), "do_bench_cudagraph"
        except Exception as err:  # capture fails for some contenders (host syncs, dynamic allocations)
            ctx.note(f"CUDA graph capture failed ({type(err).__name__}: {str(err)[:120]}); used do_bench instead")
            torch.cuda.synchronize()
    q = triton.testing.do_bench(runner, warmup=ctx.warmup_ms, rep=ctx.rep_ms, quantiles=quantiles)
    return (float(q[0]), float(q[1]), float(q[2])), "do_bench"


# ------------------------------------------------------------------------------------------------- one case
def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _failure(record: Record, err: BaseException) -> None:
    record.status = "oom" if _is_oom(err) else "unavailable" if isinstance(err, NotImplementedError) else "error"
    record.reason = f"{type(err).__name__}: {str(err).strip()[:300]}"


def _check(record: Record, build: Callable[[], Runner | Contender], ref: Any, ctx: Context) -> Runner | None:
    """Build and check one contender; returns its runner when it passed, else fills the record's failure."""
    try:
        built = build()
        contender = built if isinstance(built, Contender) else Contender(built)
        out = (contender.check or contender.run)()
        _sync(ctx.device)
        record.max_rel_err = max_rel_error(out, ref)
        del out
    except Unavailable as why:
        record.status, record.reason = "unavailable", str(why)
        return None
    except Exception as err:
        _failure(record, err)
        log.debug("contender %s failed", record.contender, exc_info=True)
        return None
    if record.max_rel_err > (record.tolerance or 0.0):
        record.status = "check_failed"
        record.reason = f"max relative error {record.max_rel_err:.3g} > tolerance {record.tolerance:.3g}"
        return None
    return contender.run


def _metrics(work: dict[str, float], median_ms: float) -> dict[str, float | None]:
    seconds = median_ms * 1e-3
    out: dict[str, float | None] = {}
    if "flops" in work:
        out["tflops"] = work["flops"] / seconds / 1e12
    if "bytes" in work:
        out["gbps"] = work["bytes"] / seconds / 1e9
    if "tokens" in work:
        out["tokens_per_s"] = work["tokens"] / seconds
    return out


def _time_all(runners: dict[str, Runner], records: dict[str, Record], ctx: Context) -> None:
    if not ctx.is_cuda:
        for name, (median, p20, p80) in time_cpu(runners, ctx).items():
            records[name].median_ms, records[name].p20_ms, records[name].p80_ms = median, p20, p80
            records[name].timing = "perf_counter interleaved"
        return
    for name, runner in runners.items():
        torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            (median, p20, p80), method = time_cuda(runner, ctx)
        except Exception as err:
            _failure(records[name], err)
            continue
        records[name].median_ms, records[name].p20_ms, records[name].p80_ms = median, p20, p80
        records[name].timing = method
        records[name].metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30


def contender_family(name: str) -> str:
    """'tilefuse' for 'tilefuse' and its alternatives ('tilefuse_prepass'): one family is never its own peer."""
    return name.split("_", 1)[0]


def _rank(records: dict[str, Record]) -> None:
    timed = {n: r.median_ms for n, r in records.items() if r.status == "ok" and r.median_ms}
    for name, record in records.items():
        peers = {n: ms for n, ms in timed.items() if contender_family(n) != contender_family(name)}
        if record.median_ms and peers:
            record.best_peer = min(peers, key=lambda n: peers[n])
            record.speedup_vs_best_peer = peers[record.best_peer] / record.median_ms


def profile_case(case: Case, ctx: Context) -> None:
    """Warm the `ctx.profile` contender up (compiles happen outside the profiled range), then call it
    `ctx.profile_calls` times between cudaProfilerStart and Stop, for `ncu --profile-from-start off`
    (benchmarks/profile.py). Cases without that contender (norms' copy yardstick) are left alone."""
    if ctx.profile is None or ctx.profile not in case.contenders:
        return
    built = case.contenders[ctx.profile]()
    runner = built.run if isinstance(built, Contender) else built
    for _ in range(2):
        runner()
    _sync(ctx.device)
    if ctx.is_cuda:
        torch.cuda.profiler.start()
    try:
        for _ in range(ctx.profile_calls):
            runner()
        _sync(ctx.device)
    finally:
        if ctx.is_cuda:
            torch.cuda.profiler.stop()
    log.info("profiled %s: %s (%d calls)", case.name, ctx.profile, ctx.profile_calls)


def run_case(suite: str, case: Case, ctx: Context) -> list[Record]:
    """Check every wanted contender against the reference, time those that pass, and rank them (or, with
    `ctx.profile` set, only run that contender for a profiler and return no record)."""
    torch._dynamo.reset()  # every case compiles its own graphs; stale ones would only count against the limit
    if ctx.profile is not None:
        profile_case(case, ctx)
        return []
    names = [n for n in case.contenders if ctx.wants(n)]
    records = {n: Record(suite, case.name, case.params, n, "ok", tolerance=case.tolerance) for n in names}
    try:
        ref = case.reference()
    except Exception as err:
        for record in records.values():
            _failure(record, err)
            record.reason = f"reference failed: {record.reason}"
        ctx.case_done(list(records.values()))
        return list(records.values())
    runners = {}
    for name in names:
        runner = _check(records[name], case.contenders[name], ref, ctx)
        if runner is not None:
            runners[name] = runner
    del ref
    _time_all(runners, records, ctx)
    for record in records.values():
        if record.status == "ok" and record.median_ms:
            record.metrics.update(_metrics(case.work, record.median_ms))
    _rank(records)
    release_memory(ctx.device)
    ctx.case_done(list(records.values()))
    return list(records.values())


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def configure_dynamo() -> None:
    """Many shapes compile the same functions: raise the recompile limit so nothing silently falls back."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, 1024)


def output_tensors(value: Any) -> list[Tensor]:
    """The tensors of a model's output, in order: nested tuples, lists and dicts (Hugging Face's ModelOutput is a
    dict) and diffusers' output dataclasses (`.sample`, or an AutoencoderKL's `.latent_dist` by its mean)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in output_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in output_tensors(v)]
    sample = getattr(value, "sample", None)
    if sample is None and hasattr(value, "latent_dist"):
        sample = value.latent_dist.mean
    return output_tensors(sample) if sample is not None else []


def executed_ops(fn: Callable[[], Any]) -> tuple[Any, Counter[str]]:
    """Run fn under torch.profiler: (its result, how many times each tilefuse:: op executed, forward and backward)
    — what ran, not what the fusion report says."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, Counter(e.name for e in prof.events() if e.name.startswith("tilefuse::"))


# ------------------------------------------------------------------------------ comparing a compiled model with eager


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    """`module` with every parameter moved by seeded noise, in place: norm weights of ones and biases of zeros
    would hide a fused op that drops them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def weighted_loss(outputs: Sequence[Tensor], seed: int = 1) -> Tensor:
    """A scalar whose gradient reaches every output element with its own seeded weight (fp32): equal outputs give
    equal gradients on both sides of a comparison, and no element's gradient is hidden by a sum or a mean."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float32) for o in outputs]
    terms = [(o.float() * w.to(o.device)).sum() for o, w in zip(outputs, weights, strict=True)]
    return sum(terms, torch.zeros((), device=terms[0].device if terms else "cpu"))


def grad_diff(ours: nn.Module, eager: nn.Module) -> tuple[float, float]:
    """The largest parameter-gradient difference between two twins of a model, and eager's largest gradient; the
    difference is inf where one side has a gradient the other lacks."""
    worst, scale = 0.0, 0.0
    for a, e in zip(ours.parameters(), eager.parameters(), strict=True):
        if (a.grad is None) != (e.grad is None):
            return math.inf, scale
        if a.grad is not None and e.grad is not None:
            worst = max(worst, float((a.grad.double() - e.grad.double()).abs().max()))
            scale = max(scale, float(e.grad.abs().max()))
    return worst, scale
