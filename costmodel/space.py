"""The search space of one kernel launch on one GPU: the tile configs its kernel family can launch, with hard
constraints filtered out before anything is suggested (Optuna's constraints are soft, so an infeasible config must
never reach the sampler).

The knob grid of each family lives on its record (`codegen.families`); here it meets the GPU model: the shared
memory limit, occupancy and, when given, compiler facts. Knobs a family does not read stay at one value (their
launcher default), so every config of a space is distinct as a launch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tilefuse.codegen.families import default_config, family_record, is_static, kernel_family, plan_for
from tilefuse.codegen.tile_config import PARAMS, TileConfig, config_from_dict, config_to_dict
from tilefuse.specs import Spec

from .features import KernelFeatures
from .hardware import GPUSpec
from .occupancy import occupancy

MAX_THREADS_PER_PROGRAM = 1024


@dataclass(frozen=True)
class Rejected:
    config: TileConfig
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class SearchSpace:
    """The feasible configs of one Spec's kernel family on one GPU, in a stable order, plus why the others were
    dropped. `choices` holds every PARAMS knob (one value for the knobs the family does not read)."""

    spec: Spec
    gpu: GPUSpec
    configs: tuple[TileConfig, ...]
    rejected: tuple[Rejected, ...] = ()
    choices: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kind: str = "attention"

    @property
    def tunable(self) -> bool:
        return len(self.configs) > 1

    def __contains__(self, config: object) -> bool:
        return config in self.configs


def infeasible_reasons(
    spec: Spec, config: TileConfig, gpu: GPUSpec, features: KernelFeatures | None = None, kind: str | None = None
) -> list[str]:
    """Why `config` must not be launched by kernel family `kind` (default: the Spec's forward family) for `spec`
    on `gpu`; [] when it may. Compiler `features` (registers, spills, shared memory from a real compile for the
    arch) tighten the estimate when given: spills are refused."""
    record = family_record(kind or kernel_family(spec))
    plan = plan_for(spec, config, record.name)
    reasons = plan.infeasible_reasons(gpu.target())
    if reasons:
        return reasons
    if config.num_warps * 32 > MAX_THREADS_PER_PROGRAM:
        reasons.append(f"num_warps={config.num_warps} exceeds {MAX_THREADS_PER_PROGRAM} threads per program")
    reasons += record.duplicate_reasons(plan.spec, config)
    if features is not None:
        if not features.ok:
            reasons.append(f"compile: {features.reason}")
        elif features.spill_bytes:
            reasons.append(f"spills {features.spill_bytes} B per thread on {features.arch}")
    occ = occupancy(plan, gpu, registers=features.registers if features and features.ok else None)
    if occ.reason:
        reasons.append(occ.reason)
    return reasons


def family_choices(spec: Spec, gpu: GPUSpec, kind: str | None = None) -> dict[str, tuple[int, ...]]:
    """The knob grid of a family on `gpu`: its record's `knob_grid`, every other knob fixed at the launcher
    default."""
    record = family_record(kind or kernel_family(spec))
    grid: dict[str, tuple[int, ...]] = {
        name: (value,) for name, value in config_to_dict(default_config(spec, record.name)).items()
    }
    grid.update(record.knob_grid(record.check(spec), gpu.sm_count))
    return grid


def _grid(choices: Mapping[str, tuple[int, ...]]) -> Iterable[TileConfig]:
    for values in itertools.product(*(choices[name] for name in PARAMS)):
        yield config_from_dict(dict(zip(PARAMS, values, strict=True)))


def build_space(
    spec: Spec,
    gpu: GPUSpec,
    *,
    kind: str | None = None,
    choices: Mapping[str, Sequence[int]] | None = None,
    features: Mapping[TileConfig, KernelFeatures] | None = None,
) -> SearchSpace:
    """Every feasible config of kernel family `kind` (default: the Spec's forward family) for `spec` on `gpu`;
    `choices` overrides the grid of some knobs. Raises ValueError for a Spec with dynamic dims (tune a concrete
    shape of its bucket instead), an unknown knob, or when no config survives the constraints."""
    if not is_static(spec):
        raise ValueError(f"build_space needs static shapes; {spec.kind} spec has a dynamic dim: {spec}")
    kind = family_record(kind or kernel_family(spec)).name
    unknown = set(choices or {}) - set(PARAMS)
    if unknown:
        raise ValueError(f"unknown knobs {sorted(unknown)}; expected some of {list(PARAMS)}")
    grid = family_choices(spec, gpu, kind)
    grid.update({name: tuple(sorted({int(v) for v in values})) for name, values in (choices or {}).items()})
    feasible: list[TileConfig] = []
    rejected: list[Rejected] = []
    for config in _grid(grid):
        reasons = infeasible_reasons(spec, config, gpu, (features or {}).get(config), kind)
        if reasons:
            rejected.append(Rejected(config, tuple(reasons)))
        else:
            feasible.append(config)
    if not feasible:
        why = "; ".join(sorted({r for item in rejected for r in item.reasons})[:5])
        raise ValueError(f"no feasible {kind} tile config for {spec} on {gpu.name}: {why}")
    return SearchSpace(spec, gpu, tuple(feasible), tuple(rejected), grid, kind)


def compile_facts(
    spec: Spec, configs: Iterable[TileConfig], arch: str, kind: str | None = None
) -> dict[TileConfig, KernelFeatures]:
    """Compiler facts (registers, spills, shared memory) of each config of family `kind`, compiled for `arch` on
    this machine (cached on disk by costmodel.features). Slow the first time: about a second per config."""
    from .features import plan_features

    return {config: plan_features(plan_for(spec, config, kind), arch) for config in configs}
