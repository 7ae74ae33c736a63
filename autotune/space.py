"""The search space of one kernel launch: the tile configs its kernel family can launch, with hard constraints
filtered out before anything is suggested (Optuna's constraints are soft, so an infeasible config must never reach
the sampler).

Kernel families (`KERNEL_FAMILIES`) and the TileConfig knobs each one reads (`codegen.plan.TileConfig`):
"attention" (the forward; decode-shaped Specs launch the split-KV kernel, family "attention_decode"),
"attention_backward", "norm", "norm_backward" and "rope". Knobs a family does not read stay at one value (their
TileConfig default), so every config of a space is distinct as a launch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tilefuse.codegen.norm_kernels import MAX_ROW_BLOCK
from tilefuse.codegen.plan import TileConfig, TiledPlan, launcher_config
from tilefuse.costmodel.features import KernelFeatures
from tilefuse.costmodel.hardware import GPUSpec
from tilefuse.costmodel.occupancy import occupancy
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

PARAMS: tuple[str, ...] = ("block_m", "block_n", "num_warps", "num_stages", "num_splits")
HEURISTIC_SPLITS = 0  # num_splits as stored in dicts and search choices when the launcher's heuristic picks it
KERNEL_FAMILIES: tuple[str, ...] = (
    "attention", "attention_decode", "attention_backward", "norm", "norm_backward", "rope",
)  # fmt: skip
# The TiledPlan family of each kernel family (the plan calls the FA2 forward "attention_fwd").
PLAN_FAMILY = {"attention": "attention_fwd", **{name: name for name in KERNEL_FAMILIES[1:]}}
# Choices per knob; every block a power of two that tl.dot accepts. Knobs missing here keep their default.
ATTENTION_CHOICES: dict[str, tuple[int, ...]] = {
    "block_m": (16, 32, 64, 128, 256),
    "block_n": (16, 32, 64, 128),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
}
FAMILY_CHOICES: dict[str, dict[str, tuple[int, ...]]] = {
    "attention": ATTENTION_CHOICES,
    # Split-KV decode: rows are fixed by the GQA group; the key block, warps, stages and the split count vary.
    "attention_decode": {
        "block_n": (16, 32, 64, 128),
        "num_warps": (2, 4, 8),
        "num_stages": (1, 2, 3, 4),
        "num_splits": (HEURISTIC_SPLITS, 4, 8, 16, 32, 64, 128),
    },
    "attention_backward": {
        "block_m": (16, 32, 64, 128),
        "block_n": (16, 32, 64, 128),
        "num_warps": (2, 4, 8),
        "num_stages": (1, 2, 3),
    },
    # block_n: the row block (whole row, or chunks of it); the choices that fit the Spec's width are added per Spec.
    "norm": {"num_warps": (1, 2, 4, 8, 16, 32), "block_n": ()},
    # num_splits: programs of the partial dweight/dbias reduction; multiples of the SM count are added per GPU.
    "norm_backward": {"num_warps": (1, 2, 4, 8, 16, 32), "num_splits": (), "block_n": ()},
    "rope": {"block_m": (1, 2, 4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8)},
}
NORM_BACKWARD_SM_MULTIPLES = (0.5, 1, 2, 4)
NORM_CHUNKS = (1024, 2048, 4096, 8192)  # chunk columns a norm search tries for rows wider than the chunk
MAX_THREADS_PER_PROGRAM = 1024


def family(spec: Spec) -> str:
    """The Spec's kind: "attention", "rmsnorm", "layernorm" or "rope"."""
    if not isinstance(spec, AttentionSpec | NormSpec | RopeSpec):
        raise TypeError(f"spec must be an AttentionSpec, NormSpec or RopeSpec, got {type(spec).__name__}")
    return str(spec.kind)


def kernel_family(spec: Spec, backward: bool = False) -> str:
    """The kernel family a site's forward (or, with `backward`, its backward) launches; see KERNEL_FAMILIES."""
    kind = family(spec)
    if isinstance(spec, RopeSpec):
        if backward:
            raise ValueError("the RoPE backward reuses the forward kernel's knobs; tune family 'rope'")
        return "rope"
    if isinstance(spec, NormSpec):
        return "norm_backward" if backward else "norm"
    if backward:
        return "attention_backward"
    if is_static(spec) and TiledPlan(spec).kernel_family == "attention_decode":
        return "attention_decode"
    return kind


def spec_families(spec: Spec) -> tuple[str, ...]:
    """Every kernel family that can launch for a Spec of this kind (the decode kernel only for decode shapes)."""
    if isinstance(spec, RopeSpec):
        return ("rope",)
    if isinstance(spec, NormSpec):
        return ("norm", "norm_backward")
    family(spec)  # TypeError for anything but the three Spec kinds
    return ("attention", "attention_decode", "attention_backward")


def site_families(spec: Spec) -> tuple[str, ...]:
    """The kernel families one fused site launches: its forward kernel's, then its backward's (training only; RoPE's
    backward reuses the forward kernel and its knobs)."""
    if isinstance(spec, RopeSpec):
        return ("rope",)
    return (kernel_family(spec), kernel_family(spec, backward=True))


def _check_family(name: str) -> str:
    if name not in KERNEL_FAMILIES:
        raise ValueError(f"kernel family {name!r}; expected one of {list(KERNEL_FAMILIES)}")
    return name


def is_static(spec: Spec) -> bool:
    """Whether every shape dim is known (a TiledPlan, and so the cost model, needs static shapes)."""
    if isinstance(spec, AttentionSpec):
        return None not in (spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len)
    return bool(spec.shape) and None not in spec.shape


def plan_for(spec: Spec, config: TileConfig, kind: str | None = None) -> TiledPlan:
    """The TiledPlan of `config` launched by kernel family `kind` (default: the Spec's forward family)."""
    return TiledPlan(spec, config, PLAN_FAMILY[_check_family(kind or kernel_family(spec))])


def default_config(spec: Spec, kind: str | None = None) -> TileConfig:
    """The config the launcher of family `kind` (default: the Spec's forward family) uses when given none."""
    kind = _check_family(kind or kernel_family(spec))
    if isinstance(spec, AttentionSpec) and not is_static(spec):  # shape-independent defaults of the FA2 forward
        from tilefuse.codegen.attention_fwd import default_config as attention_default

        head_dim = max(spec.head_dim, spec.v_head_dim)
        return TileConfig(*attention_default(head_dim, spec.mask != "none", spec.rope is not None))
    config = launcher_config(spec, PLAN_FAMILY[kind])
    if kind == "norm_backward":
        return TileConfig(block_n=config.block_n, num_warps=config.num_warps)
    return config


def config_to_dict(config: TileConfig) -> dict[str, int]:
    """The config as plain ints; num_splits None (the launcher's heuristic) is stored as HEURISTIC_SPLITS."""
    data = {name: int(getattr(config, name)) for name in PARAMS[:4]}
    data["num_splits"] = HEURISTIC_SPLITS if config.num_splits is None else int(config.num_splits)
    return data


def config_from_dict(data: object) -> TileConfig:
    """A TileConfig from its dict (num_splits may be absent: records written before it existed); TypeError or
    ValueError naming the bad field otherwise (never a partial config)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a tile config must be a dict with keys {list(PARAMS)}, got {type(data).__name__}")
    if not set(PARAMS[:4]) <= set(data) <= set(PARAMS):
        raise ValueError(f"a tile config needs the keys {list(PARAMS)} (num_splits optional), got {sorted(data)}")
    for name in PARAMS:
        if name not in data:
            continue
        value = data[name]
        lowest = HEURISTIC_SPLITS if name == "num_splits" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise ValueError(f"tile config {name}={value!r}: expected an int >= {lowest}")
    splits = int(data.get("num_splits", HEURISTIC_SPLITS))
    block_m, block_n, warps, stages = (int(data[name]) for name in PARAMS[:4])
    return TileConfig(block_m, block_n, warps, stages, None if splits == HEURISTIC_SPLITS else splits)


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


def _duplicate_reasons(plan: TiledPlan, config: TileConfig, kind: str) -> list[str]:
    """A request the launcher would shrink or clamp launches the same kernel as a smaller config."""
    if kind in ("attention", "attention_backward") and plan.blocks[:2] != (config.block_m, config.block_n):
        return [f"blocks {config.block_m}x{config.block_n} shrink to {plan.blocks[0]}x{plan.blocks[1]}"]
    if kind == "attention_decode":
        if plan.blocks[1] != config.block_n:
            return [f"block_n={config.block_n} shrinks to {plan.blocks[1]}"]
        layout = plan.decode_layout()
        if config.num_splits is not None and layout.work_splits < config.num_splits:
            return [f"num_splits={config.num_splits}: only {layout.work_splits} splits have key blocks"]
    if kind in ("norm", "norm_backward") and plan.blocks[0] != config.block_n:
        return [f"block_n={config.block_n} shrinks to the row's block {plan.blocks[0]}"]
    if kind in ("rope", "norm_backward"):
        rows = plan._rows()
        if kind == "rope" and config.block_m > 1 and config.block_m // 2 >= rows:
            return [f"block_m={config.block_m} rows per program for {rows} rows"]
        if kind == "norm_backward" and config.num_splits is not None and config.num_splits > rows:
            return [f"num_splits={config.num_splits} programs for {rows} rows"]
    return []


def infeasible_reasons(
    spec: Spec, config: TileConfig, gpu: GPUSpec, features: KernelFeatures | None = None, kind: str | None = None
) -> list[str]:
    """Why `config` must not be launched by kernel family `kind` (default: the Spec's forward family) for `spec`
    on `gpu`; [] when it may. Compiler `features` (registers, spills, shared memory from a real compile for the
    arch) tighten the estimate when given: spills are refused."""
    kind = _check_family(kind or kernel_family(spec))
    plan = plan_for(spec, config, kind)
    reasons = plan.infeasible_reasons(gpu.target())
    if reasons:
        return reasons
    if config.num_warps * 32 > MAX_THREADS_PER_PROGRAM:
        reasons.append(f"num_warps={config.num_warps} exceeds {MAX_THREADS_PER_PROGRAM} threads per program")
    reasons += _duplicate_reasons(plan, config, kind)
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
    """The knob grid of a family on `gpu`: its FAMILY_CHOICES, every other knob fixed at the launcher default."""
    kind = _check_family(kind or kernel_family(spec))
    base = config_to_dict(default_config(spec, kind))
    grid: dict[str, tuple[int, ...]] = {name: (value,) for name, value in base.items()}
    grid.update(FAMILY_CHOICES[kind])
    if kind == "norm_backward":  # the launcher runs at most one program per row
        rows = math.prod(int(d or 1) for d in spec.shape[:-1]) if isinstance(spec, NormSpec) else 1
        splits = {min(rows, max(1, round(gpu.sm_count * m))) for m in NORM_BACKWARD_SM_MULTIPLES}
        grid["num_splits"] = tuple(sorted(splits))
    if kind in ("norm", "norm_backward") and isinstance(spec, NormSpec):
        grid["block_n"] = norm_row_blocks(spec.width)
    return grid


def norm_row_blocks(width: int) -> tuple[int, ...]:
    """Row blocks a norm search tries: the NORM_CHUNKS narrower than the row, and the whole row when it fits in
    `norm_kernels.MAX_ROW_BLOCK` (a wider whole row spills in the backward)."""
    whole = 1 << (width - 1).bit_length()  # the whole row's power-of-two block
    return tuple(c for c in NORM_CHUNKS if c < whole) + ((whole,) if whole <= MAX_ROW_BLOCK else ())


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
        raise ValueError(f"build_space needs static shapes; {family(spec)} spec has a dynamic dim: {spec}")
    kind = _check_family(kind or kernel_family(spec))
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
    from tilefuse.costmodel.features import plan_features

    return {config: plan_features(plan_for(spec, config, kind), arch) for config in configs}
