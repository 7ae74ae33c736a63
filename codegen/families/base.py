"""KernelFamily: one record per kernel family — its Spec type, knob grid, default config, plan terms (blocks, grid,
bytes, FLOPs, SRAM, feasibility), compile-check variants and launch key — plus the helpers every family shares.

A record is a stateless singleton; its methods take the Spec and the TileConfig. The byte convention of every
family is the one `codegen/plan.py` documents (a byte counts when a program loads or stores it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from tilefuse.codegen.kernel_variant import KernelVariant
from tilefuse.codegen.launch_configs import LaunchKey
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

S = TypeVar("S", AttentionSpec, NormSpec, RopeSpec)

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "bool": 1, "uint8": 1, "int8": 1}
_POINTER = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
F32_BYTES = 4  # lse, delta, ALiBi slopes, norm statistics and split-KV partials are fp32
RNG_BYTES = 16  # the int64 [seed, offset] dropout tensor, read by every program that draws
BLOCK_LIST_BYTES = 4  # int32 entries of a mask's block lists (attention_args.mask_block_list / mask_kept_blocks)


def itemsize(dtype: str) -> int:
    """Bytes per element of a Spec dtype string ('float16', 'torch.bfloat16', ...)."""
    name = dtype.removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_ITEMSIZE)}")
    return _ITEMSIZE[name]


def pointer_type(dtype: str) -> str:
    """The Triton pointer type of a kernel argument in a Spec dtype ('*bf16', ...)."""
    name = dtype.removeprefix("torch.")
    if name not in _POINTER:
        raise ValueError(f"dtype {dtype!r} has no kernel; expected one of {sorted(_POINTER)}")
    return _POINTER[name]


def static(name: str, value: int | None) -> int:
    """A shape dim a plan needs; ValueError when it is dynamic."""
    if value is None:
        raise ValueError(f"TiledPlan needs static shapes; {name} is dynamic (None)")
    return value


def is_static(spec: Spec) -> bool:
    """Whether every shape dim is known (a TiledPlan, and so the cost model, needs static shapes)."""
    if isinstance(spec, AttentionSpec):
        return None not in (spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len)
    return bool(spec.shape) and None not in spec.shape


def spec_rows(spec: NormSpec | RopeSpec) -> int:
    """Rows of a norm or RoPE Spec: the product of every dim but the last (static dims required)."""
    if not spec.shape:
        raise ValueError(f"{type(spec).__name__} needs a static shape to plan, got ()")
    return math.prod(static(f"shape[{i}]", d) for i, d in enumerate(spec.shape[:-1]))


def knobs(**choices: tuple[int, ...]) -> Mapping[str, tuple[int, ...]]:
    """A family's static knob grid (read-only: the records are shared singletons)."""
    return MappingProxyType(choices)


def is_pow2(value: int, lowest: int = 1) -> bool:
    return value >= lowest and not value & (value - 1)


class PlanCosts(Protocol):
    """Bytes and FLOPs of all the kernels of one launch (a family's cost tuple may hold more, e.g. grids)."""

    @property
    def read_bytes(self) -> int: ...

    @property
    def write_bytes(self) -> int: ...

    @property
    def flops(self) -> int: ...


class Costs(NamedTuple):
    read_bytes: int
    write_bytes: int
    flops: int


class KernelFamily(Generic[S]):
    """One kernel family. Subclasses set the class attributes and the plan terms; the defaults here are the terms
    a family without staged tiles, extra knobs or a launch key has."""

    name: str  # the family's name in tuning databases and launch keys
    spec_type: type[S]
    backward: bool = False  # launched by the site's backward (training)
    # (module, name) of the main Triton kernel; its source digest (autotune.keys) covers every @triton.jit helper
    # of its module too (the decode combine kernel, the backward's dQ and preprocess kernels, shared tile helpers)
    kernel_source: tuple[str, str]
    choices: Mapping[str, tuple[int, ...]] = knobs()  # the static knob grid; knobs left out keep the default

    def check(self, spec: object) -> S:
        """`spec` when this family launches for it, else TypeError."""
        if not isinstance(spec, self.spec_type):
            raise TypeError(f"kernel family {self.name!r} plans a {self.spec_type.__name__}, got {type(spec).__name__}")
        return spec

    def dispatches(self, spec: S) -> bool:
        """Whether the dispatcher launches this family for `spec` (a later family of the table that dispatches
        wins: a specialized kernel is listed after the general one)."""
        return True

    def knob_grid(self, spec: S, sm_count: int) -> dict[str, tuple[int, ...]]:
        """The knob choices a search tries for `spec` on a GPU with `sm_count` SMs."""
        return dict(self.choices)

    def default_config(self, spec: S) -> TileConfig:
        """The config the family's launcher uses when given none."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- plan terms
    def blocks(self, spec: S, config: TileConfig) -> tuple[int, ...]:
        raise NotImplementedError

    def grid(self, spec: S, config: TileConfig) -> tuple[int, ...]:
        raise NotImplementedError

    def costs(self, spec: S, config: TileConfig) -> PlanCosts:
        """HBM bytes loaded and stored by all programs of all the family's kernels, and their FLOPs."""
        raise NotImplementedError

    def read_bytes(self, spec: S, config: TileConfig) -> int:
        return self.costs(spec, config).read_bytes

    def write_bytes(self, spec: S, config: TileConfig) -> int:
        return self.costs(spec, config).write_bytes

    def flops(self, spec: S, config: TileConfig) -> int:
        return self.costs(spec, config).flops

    def smem_bytes(self, spec: S, config: TileConfig) -> int:
        """Shared memory one program stages; 0 for families that hold no staged tiles."""
        return 0

    def sram_bytes(self, spec: S, config: TileConfig) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ feasibility
    def knob_reasons(self, spec: S, config: TileConfig) -> list[str]:
        """Why the family's own knobs are invalid; [] when they are valid."""
        return []

    def target_reasons(self, spec: S, config: TileConfig, target: Mapping[str, Any]) -> list[str]:
        """Why the plan does not fit `target` (head dim, shared memory, tile rows); [] when it does."""
        return []

    def infeasible_reasons(self, spec: S, config: TileConfig, target: Mapping[str, Any]) -> list[str]:
        """Why `config` cannot run for `spec` on `target` ({"smem_bytes": ..., "max_head_dim": ...}); []: it can."""
        reasons = self.knob_reasons(spec, config)
        if not is_pow2(config.num_warps):
            reasons.append(f"num_warps={config.num_warps} is not a power of two")
        if config.num_stages < 1:
            reasons.append(f"num_stages={config.num_stages} < 1")
        return reasons + self.target_reasons(spec, config, target)

    def duplicate_reasons(self, spec: S, config: TileConfig) -> list[str]:
        """Why `config` launches the same kernel as a smaller config (a request the launcher shrinks or clamps)."""
        return []

    # ------------------------------------------------------------------------------------- compile and launch
    def variants(self, spec: S, config: TileConfig) -> tuple[KernelVariant, ...]:
        """The kernels a launch runs whose resources depend on the knobs, main kernel first, as compile-check
        variants with launch-like integer specialization."""
        raise NotImplementedError

    def checked_variants(self, spec: S, config: TileConfig) -> tuple[KernelVariant, ...]:
        """The kernels compile-check reports for a launch at `config`: `variants`, then any fixed helper kernel
        whose resources the cost model leaves out (decode's phase 2)."""
        return self.variants(spec, config)

    def launch_key(self, spec: S) -> LaunchKey | None:
        """The key a launch of `spec` looks its tuned config up by (codegen/launch_configs.py); None: no key."""
        raise NotImplementedError
