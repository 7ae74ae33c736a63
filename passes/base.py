"""What every pass shares: the PassResult it returns, the context it records sites in, and Site records.

A pass is a callable `(GraphModule, PassContext) -> PassResult` that rewrites the graph and says whether it did; the
PassManager (manager.py) then drops dead code, recompiles and checks the graph, so a pass does none of that.
Recognizers decline by recording a Site with a reason; they never raise to say "no match".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch.fx as fx

from ..specs import Spec
from .advice import Advice, advise

SiteKind = Literal["attention", "rmsnorm", "layernorm", "rope"]
FUSION_KINDS: tuple[str, ...] = ("attention", "rmsnorm", "layernorm", "rope", "residual")


@dataclass
class Site:
    """One candidate site: where it is, what it became, and why not when declined."""

    kind: SiteKind
    status: Literal["fused", "declined"]
    node: str
    spec: Spec | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "status": self.status,
            "node": self.node,
            "reason": self.reason,
            "spec": self.spec.to_dict() if self.spec is not None else None,
            **({"detail": self.detail} if self.detail else {}),
        }


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run: enabled fusions, site records, counters, advice."""

    enabled: frozenset[str] = frozenset(FUSION_KINDS)
    sites: list[Site] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    advice: list[Advice] = field(default_factory=list)

    def advise(self, key: str, problem: str, fix: str) -> None:
        """A fixable reason fusion fell off: warned once per process (passes.advice), kept for this report."""
        found = advise(key, problem, fix)
        if all(a.key != key for a in self.advice):
            self.advice.append(found)

    def fused(self, kind: SiteKind, node: fx.Node, spec: Spec, **detail: Any) -> None:
        self.sites.append(Site(kind, "fused", node.name, spec=spec, detail=detail))
        self.counters[f"{kind}_fused"] += 1

    def declined(self, kind: SiteKind, node: fx.Node, reason: str, spec: Spec | None = None) -> None:
        self.sites.append(Site(kind, "declined", node.name, spec=spec, reason=reason))
        self.counters[f"{kind}_declined"] += 1

    def is_enabled(self, kind: str) -> bool:
        return kind in self.enabled


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class GraphPass(Protocol):
    @property
    def name(self) -> str: ...

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult: ...


class Decline(Exception):
    """Raised inside a matcher to abandon a candidate; the matcher's caller turns it into a declined Site.

    Internal control flow only: it never leaves a pass.
    """

    def __init__(self, reason: str, spec: Spec | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.spec = spec


class FixableDecline(Decline):
    """A decline the user can fix: the pass that catches it tells `fix` once through `ctx.advise(key, ...)`."""

    def __init__(self, reason: str, key: str, fix: str, spec: Spec | None = None) -> None:
        super().__init__(reason, spec)
        self.key = key
        self.fix = fix
