"""The table of kernel families: the one place the dispatch, the planner, autotune, the cost model and compile-check
look a family up. Adding a family means adding its module and one entry here.

Family names are what tuning databases store ("attention" is the FA2 forward): they must not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

from .attention import ATTENTION
from .attention_backward import ATTENTION_BACKWARD
from .base import KernelFamily, is_static
from .decode import DECODE
from .norm import NORM
from .norm_backward import NORM_BACKWARD
from .rope import ROPE

if TYPE_CHECKING:
    from tilefuse.codegen.plan import TiledPlan

FAMILIES: dict[str, KernelFamily[Any]] = {
    record.name: record for record in (ATTENTION, DECODE, ATTENTION_BACKWARD, NORM, NORM_BACKWARD, ROPE)
}
KERNEL_FAMILIES: tuple[str, ...] = tuple(FAMILIES)

__all__ = ["FAMILIES", "KERNEL_FAMILIES", "KernelFamily", "default_config", "family_record", "is_static",
           "kernel_family", "plan_for", "site_families", "spec_families"]  # fmt: skip


def family_record(name: str) -> KernelFamily[Any]:
    """The record of kernel family `name`, else ValueError."""
    if name not in FAMILIES:
        raise ValueError(f"kernel family {name!r}; expected one of {list(KERNEL_FAMILIES)}")
    return FAMILIES[name]


def _records_of(spec: Spec) -> list[KernelFamily[Any]]:
    if not isinstance(spec, AttentionSpec | NormSpec | RopeSpec):
        raise TypeError(f"spec must be an AttentionSpec, NormSpec or RopeSpec, got {type(spec).__name__}")
    return [record for record in FAMILIES.values() if isinstance(spec, record.spec_type)]


def kernel_family(spec: Spec, backward: bool = False) -> str:
    """The kernel family a site's forward (or, with `backward`, its backward) launches: of the families of the
    Spec's type that dispatch for it, the last in the table (decode shapes pick the split-KV decode kernel)."""
    records = _records_of(spec)
    picked = [record for record in records if record.backward == backward and record.dispatches(spec)]
    if not picked:
        raise ValueError(f"the {spec.kind} backward reuses the forward kernel's knobs; tune family {records[0].name!r}")
    return picked[-1].name


def spec_families(spec: Spec) -> tuple[str, ...]:
    """Every kernel family that can launch for a Spec of this kind (the decode kernel only for decode shapes)."""
    return tuple(record.name for record in _records_of(spec))


def site_families(spec: Spec) -> tuple[str, ...]:
    """The kernel families one fused site launches: its forward kernel's, then its backward's (training only; RoPE's
    backward reuses the forward kernel and its knobs)."""
    has_backward = any(record.backward for record in _records_of(spec))
    return (kernel_family(spec), kernel_family(spec, backward=True)) if has_backward else (kernel_family(spec),)


def plan_for(spec: Spec, config: TileConfig, kind: str | None = None) -> TiledPlan:
    """The TiledPlan of `config` launched by kernel family `kind` (default: the Spec's forward family)."""
    from tilefuse.codegen.plan import TiledPlan  # the plan is a facade over this table

    return TiledPlan(spec, config, family_record(kind or kernel_family(spec)).name)


def default_config(spec: Spec, kind: str | None = None) -> TileConfig:
    """The config the launcher of family `kind` (default: the Spec's forward family) uses when given none."""
    record = family_record(kind or kernel_family(spec))
    return record.default_config(record.check(spec))
