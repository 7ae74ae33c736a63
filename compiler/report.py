"""FusionReport: every candidate site of a capture, fused or declined with its reason."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..passes.advice import Advice
from ..passes.base import Site


@dataclass
class FusionReport:
    """What the passes did to one or more captured graphs."""

    sites: list[Site] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    graphs: int = 0
    fallbacks: list[str] = field(default_factory=list)
    advice: list[Advice] = field(default_factory=list)  # fixable reasons fusion fell off, each with its fix
    timings_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # seconds per stage, all graphs

    def extend(self, sites: list[Site], counters: Counter[str], advice: Sequence[Advice] = ()) -> None:
        self.sites.extend(sites)
        self.counters.update(counters)
        self.graphs += 1
        for item in advice:
            self.add_advice(item)

    def add_advice(self, item: Advice) -> None:
        if all(a.key != item.key for a in self.advice):
            self.advice.append(item)

    def by_kind(self, kind: str) -> list[Site]:
        return [s for s in self.sites if s.kind == kind]

    def summary(self) -> dict[str, dict[str, int]]:
        """{kind: {"fused": n, "declined": m}}."""
        out: dict[str, dict[str, int]] = {}
        for site in self.sites:
            out.setdefault(site.kind, {"fused": 0, "declined": 0})[site.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": self.graphs,
            "summary": self.summary(),
            "counters": dict(self.counters),
            "fallbacks": list(self.fallbacks),
            "advice": [{"key": a.key, "problem": a.problem, "fix": a.fix} for a in self.advice],
            "timings_s": {k: round(v, 6) for k, v in self.timings_s.items()},
            "sites": [s.to_dict() for s in self.sites],
        }
