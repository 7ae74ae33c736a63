"""The search space of one site: the tile configs its kernel family can launch, with hard constraints filtered out
before anything is suggested (Optuna's constraints are soft, so an infeasible config must never reach the sampler).

Only the attention forward kernel takes a TileConfig; the norm and RoPE launchers pick their own blocks and warps
(`TiledPlan` documents this), so their space is the single default config.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tilefuse.codegen.plan import TileConfig, TiledPlan
from tilefuse.costmodel.features import KernelFeatures
from tilefuse.costmodel.hardware import GPUSpec
from tilefuse.costmodel.occupancy import occupancy
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

PARAMS: tuple[str, ...] = ("block_m", "block_n", "num_warps", "num_stages")
# Choices per knob for the attention forward kernel; every one a power of two that tl.dot accepts.
ATTENTION_CHOICES: dict[str, tuple[int, ...]] = {
    "block_m": (16, 32, 64, 128, 256),
    "block_n": (16, 32, 64, 128),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
}
MAX_THREADS_PER_PROGRAM = 1024


def family(spec: Spec) -> str:
    """The kernel family a Spec's site launches: "attention", "rmsnorm", "layernorm" or "rope"."""
    if not isinstance(spec, AttentionSpec | NormSpec | RopeSpec):
        raise TypeError(f"spec must be an AttentionSpec, NormSpec or RopeSpec, got {type(spec).__name__}")
    return str(spec.kind)


def is_static(spec: Spec) -> bool:
    """Whether every shape dim is known (a TiledPlan, and so the cost model, needs static shapes)."""
    if isinstance(spec, AttentionSpec):
        return None not in (spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len)
    return bool(spec.shape) and None not in spec.shape


def default_config(spec: Spec) -> TileConfig:
    """The config the launcher uses when given none (attention: codegen's spill-free default for the head dim)."""
    if isinstance(spec, AttentionSpec):
        from tilefuse.codegen.attention_fwd import default_config as attention_default

        head_dim = max(spec.head_dim, spec.v_head_dim)
        return TileConfig(*attention_default(head_dim, spec.mask != "none", spec.rope is not None))
    return TileConfig()


def config_to_dict(config: TileConfig) -> dict[str, int]:
    return {name: int(getattr(config, name)) for name in PARAMS}


def config_from_dict(data: object) -> TileConfig:
    """A TileConfig from its dict; TypeError/ValueError naming the bad field otherwise (never a partial config)."""
    if not isinstance(data, dict):
        raise TypeError(f"a tile config must be a dict with keys {list(PARAMS)}, got {type(data).__name__}")
    if set(data) != set(PARAMS):
        raise ValueError(f"a tile config needs exactly the keys {list(PARAMS)}, got {sorted(data)}")
    for name in PARAMS:
        value = data[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"tile config {name}={value!r}: expected an int >= 1")
    return TileConfig(**{name: int(data[name]) for name in PARAMS})


@dataclass(frozen=True)
class Rejected:
    config: TileConfig
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class SearchSpace:
    """The feasible configs of one Spec on one GPU, in a stable order, plus why the others were dropped."""

    spec: Spec
    gpu: GPUSpec
    configs: tuple[TileConfig, ...]
    rejected: tuple[Rejected, ...] = ()
    choices: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def tunable(self) -> bool:
        return len(self.configs) > 1

    def __contains__(self, config: object) -> bool:
        return config in self.configs


def infeasible_reasons(
    spec: Spec, config: TileConfig, gpu: GPUSpec, features: KernelFeatures | None = None
) -> list[str]:
    """Why `config` must not be launched for `spec` on `gpu`; [] when it may. Compiler `features` (registers,
    spills, shared memory from a real compile for the arch) tighten the estimate when given: spills are refused."""
    if not isinstance(spec, AttentionSpec):
        return [] if config == default_config(spec) else ["the norm/RoPE launchers take no tile config"]
    plan = TiledPlan(spec, config)
    reasons = plan.infeasible_reasons(gpu.target())
    if reasons:
        return reasons
    if config.num_warps * 32 > MAX_THREADS_PER_PROGRAM:
        reasons.append(f"num_warps={config.num_warps} exceeds {MAX_THREADS_PER_PROGRAM} threads per program")
    # The launcher shrinks blocks to the problem; a request it would shrink duplicates a smaller config.
    if plan.blocks[:2] != (config.block_m, config.block_n):
        reasons.append(f"blocks {config.block_m}x{config.block_n} shrink to {plan.blocks[0]}x{plan.blocks[1]}")
    if features is not None:
        if not features.ok:
            reasons.append(f"compile: {features.reason}")
        elif features.spill_bytes:
            reasons.append(f"spills {features.spill_bytes} B per thread on {features.arch}")
    occ = occupancy(plan, gpu, registers=features.registers if features and features.ok else None)
    if occ.reason:
        reasons.append(occ.reason)
    return reasons


def _attention_grid(choices: dict[str, tuple[int, ...]]) -> Iterable[TileConfig]:
    for values in itertools.product(*(choices[name] for name in PARAMS)):
        yield TileConfig(*values)


def build_space(
    spec: Spec,
    gpu: GPUSpec,
    *,
    choices: dict[str, Sequence[int]] | None = None,
    features: dict[TileConfig, KernelFeatures] | None = None,
) -> SearchSpace:
    """Every feasible config of `spec` on `gpu`. Raises ValueError for a Spec with dynamic dims (tune a concrete
    shape of its bucket instead) or when no config survives the constraints."""
    if not is_static(spec):
        raise ValueError(f"build_space needs static shapes; {family(spec)} spec has a dynamic dim: {spec}")
    if not isinstance(spec, AttentionSpec):
        return SearchSpace(spec, gpu, (default_config(spec),))
    grid = {name: tuple(sorted(set((choices or {}).get(name, ATTENTION_CHOICES[name])))) for name in PARAMS}
    feasible: list[TileConfig] = []
    rejected: list[Rejected] = []
    for config in _attention_grid(grid):
        reasons = infeasible_reasons(spec, config, gpu, (features or {}).get(config))
        if reasons:
            rejected.append(Rejected(config, tuple(reasons)))
        else:
            feasible.append(config)
    if not feasible:
        why = "; ".join(sorted({r for item in rejected for r in item.reasons})[:5])
        raise ValueError(f"no feasible tile config for {spec} on {gpu.name}: {why}")
    return SearchSpace(spec, gpu, tuple(feasible), tuple(rejected), grid)


def compile_facts(spec: Spec, configs: Iterable[TileConfig], arch: str) -> dict[TileConfig, KernelFeatures]:
    """Compiler facts (registers, spills, shared memory) of each config, compiled for `arch` on this machine
    (cached on disk by costmodel.features). Slow the first time: about a second per config."""
    from tilefuse.costmodel.features import plan_features

    return {config: plan_features(TiledPlan(spec, config), arch) for config in configs}
