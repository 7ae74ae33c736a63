"""Regions Dynamo gave up tracing as a higher-order op (a checkpointed function with a Python side effect, most
often): they graph-break before tilefuse sees a graph, run eagerly and fuse nothing, so the user is told once, with
the fix. Dynamo counts its graph breaks by reason; this reads the counts.
"""

from __future__ import annotations

from collections import Counter

from ..passes.advice import Advice, advise

_breaks_seen: Counter[str] = Counter()
_SIDE_EFFECT_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def region_break_advice() -> list[Advice]:
    """Advice for each higher-order-op region (a checkpoint, most often) Dynamo gave up tracing since the last call.

    Such a region graph-breaks in Dynamo, before tilefuse sees a graph: it runs eagerly and nothing in it fuses.
    Dynamo counts its graph breaks by reason; the new ones that name a higher-order op are told once, with the fix."""
    from torch._dynamo.utils import counters

    found = []
    for reason, count in list(counters["graph_break"].items()):
        if count <= _breaks_seen[reason]:
            continue
        _breaks_seen[reason] = count
        if reason.startswith("HOP"):
            found.append(_advice_for(reason))
    return found


def _advice_for(reason: str) -> Advice:
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    detail = "; ".join(line for line in lines[:3] if not line.startswith("Hint"))
    problem = f"Dynamo could not trace a higher-order op region ({detail}): it ran eagerly, unfused"
    if _SIDE_EFFECT_FLAG in reason:
        return advise(
            "checkpoint_side_effect",
            problem,
            f"set torch._dynamo.config.{_SIDE_EFFECT_FLAG} = True before compiling (the backward's recompute then "
            "does not replay Python side effects of the checkpointed code; transformers' gradient checkpointing "
            "needs it when the `kernels` package is installed), or move the side effect out of the checkpointed "
            "function",
        )
    return advise("region_graph_break", problem, "move what the explanation names out of the region")
