"""The held-out split of measurement records: which Specs (and GPU) training leaves out for evaluation.

Deterministic by the Spec, so the same Specs are held out on every machine and every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from ..specs import spec_from_dict
from .records import MeasurementRecord

log = logging.getLogger("tilefuse.costmodel")


def held_out_spec(spec_json: str, fraction: float) -> bool:
    """Deterministic by the Spec: the same Specs are held out on every machine and every run. The hash reads only
    the fields away from their defaults, so a field added to a Spec class later (with a default that keeps the old
    meaning) moves no Spec to the other side, whether its record was written before the field existed or after."""
    fields = _non_default_fields(spec_from_dict(json.loads(spec_json)))
    digest = int(hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def _non_default_fields(spec: Any) -> dict[str, Any]:
    """A Spec's kind and the fields whose value is not the dataclass default; nested Specs (an attention's RoPE)
    the same way."""
    out: dict[str, Any] = {"kind": spec.kind}
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if value != _default(field):
            out[field.name] = _non_default_fields(value) if dataclasses.is_dataclass(value) else value
    return out


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default  # MISSING (equal to no value) for a field without a default


def training_subset(records: Sequence[MeasurementRecord], fraction: float, gpu: str | None) -> list[MeasurementRecord]:
    kept = [r for r in records if not held_out_spec(r.spec_json, fraction) and r.gpu != gpu]
    if not kept:  # too few Specs to hold any out: train on all of them (eval then reports no held-out split)
        log.warning("every Spec fell in the held-out split; training on all %d records", len(records))
        kept = [r for r in records if r.gpu != gpu]
    return kept
