"""Tuning keys: which tuned config may serve which site. A key names the kernel family (codegen.families'
KERNEL_FAMILIES: the forward, decode or backward attention kernel, the norm forward or backward, RoPE), the Spec with
its shape dims bucketed to powers of two (dynamic dims marked "dyn"), the dtype, the GPU arch, the
tilefuse/Triton/torch versions and a hash of that kernel's generic source — so a config tuned for another kernel
never applies.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tilefuse.codegen.families import family_record, kernel_family, spec_families
from tilefuse.codegen.launch_configs import bucket_dim
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

# Spec fields that change no launch decision (numerics or provenance only) and stay out of the key.
_IGNORED = {
    "attention": ("scale", "source", "softcap", "dropout_p", "mask_shape", "dynamic_scalars", "sinks"),
    "norm": ("eps", "weight_offset", "compute_dtype", "dynamic_scalars", "eps_mode", "norm_scale"),
    "rope": ("source",),
}
# Spec fields one kernel family never reads: sites that differ only there share its tuned config (the norm backward
# kernel sees neither the bias nor the residual add of its forward).
_IGNORED_BY_KERNEL = {"norm_backward": ("has_bias", "residual")}
_ATTENTION_DIMS = ("batch", "q_heads", "kv_heads", "q_len", "kv_len")


def spec_bucket(spec: Spec) -> dict[str, Any]:
    """The Spec as the key sees it: shape dims bucketed, head/feature widths exact, flags that select kernel code
    kept (causal, mask kind, window presence, softcap presence, ALiBi, RoPE layout, dropout presence)."""
    data = spec.to_dict()
    if isinstance(spec, AttentionSpec):
        for name in _ATTENTION_DIMS:
            data[name] = bucket_dim(getattr(spec, name))
        data["window"] = bucket_dim(spec.window) if spec.window else None
        data["softcap_on"] = bool(spec.softcap)
        data["dropout_on"] = spec.dropout_p > 0
        data["rope"] = _rope_bucket(spec.rope) if spec.rope else None
        return _drop(data, _IGNORED["attention"])
    if isinstance(spec, NormSpec):
        data["shape"] = [*map(bucket_dim, spec.shape[:-1]), spec.shape[-1]] if spec.shape else []
        return _drop(data, _IGNORED["norm"])
    return _rope_bucket(spec)


def _rope_bucket(spec: RopeSpec) -> dict[str, Any]:
    data = spec.to_dict()
    data["shape"] = [*map(bucket_dim, spec.shape[:-1]), spec.shape[-1]] if spec.shape else []
    return _drop(data, _IGNORED["rope"])


def _drop(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in names}


@functools.cache
def versions() -> dict[str, str]:
    """tilefuse, Triton and torch versions of this process."""
    import importlib.metadata

    import torch
    import triton

    try:
        tilefuse_version = importlib.metadata.version("tilefuse")
    except importlib.metadata.PackageNotFoundError:
        tilefuse_version = "0+unknown"
    return {"tilefuse": tilefuse_version, "triton": triton.__version__, "torch": torch.__version__}


@functools.cache
def kernel_source_hash(kind: str) -> str:
    """SHA-256 of the generic Triton source of kernel family `kind`'s kernel (and the helpers it calls)."""
    import importlib

    from tilefuse.costmodel.features import kernel_source_digest

    module, name = family_record(kind).kernel_source
    return kernel_source_digest(getattr(importlib.import_module(module), name))


@dataclass(frozen=True)
class TuningKey:
    """Everything a tuned config depends on. `digest` is the primary key in the database."""

    family: str
    bucket: str  # canonical JSON of `spec_bucket`
    dtype: str
    arch: str
    versions: str  # canonical JSON of `versions()`
    source_hash: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family, "bucket": json.loads(self.bucket), "dtype": self.dtype, "arch": self.arch,
            "versions": json.loads(self.versions), "source_hash": self.source_hash,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuningKey:
        if not isinstance(data, dict):
            raise TypeError(f"a tuning key must be a dict, got {type(data).__name__}")
        missing = {"family", "bucket", "dtype", "arch", "versions", "source_hash"} - set(data)
        if missing:
            raise ValueError(f"tuning key is missing {sorted(missing)}")
        return cls(
            str(data["family"]), _canonical(data["bucket"]), str(data["dtype"]), str(data["arch"]),
            _canonical(data["versions"]), str(data["source_hash"]),
        )  # fmt: skip

    def describe(self) -> str:
        bucket = json.loads(self.bucket)
        if self.family.startswith("attention"):
            dims = "x".join(str(bucket.get(n)) for n in _ATTENTION_DIMS)
            return f"{self.family} {dims} d{bucket.get('head_dim')} {self.dtype} {self.arch}"
        kind = bucket.get("kind")
        name = self.family if kind in (None, self.family) else f"{self.family} ({kind})"
        return f"{name} {bucket.get('shape')} {self.dtype} {self.arch}"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def tuning_key(spec: Spec, arch: str, *, kind: str | None = None, source_hash: str | None = None) -> TuningKey:
    """The key of `spec` launched by kernel family `kind` (default: the Spec's forward family, `kernel_family`) on a
    GPU of `arch` ("sm_90") with this process's versions and that kernel's source."""
    if not isinstance(arch, str) or not arch.startswith("sm_"):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    kind = kind or kernel_family(spec)
    if kind not in spec_families(spec):
        raise ValueError(f"a {spec.kind} site launches kernel families {list(spec_families(spec))}, not {kind!r}")
    bucket = _drop(spec_bucket(spec), _IGNORED_BY_KERNEL.get(kind, ()))
    return TuningKey(
        kind, _canonical(bucket), spec.dtype.removeprefix("torch."), arch, _canonical(versions()),
        source_hash if source_hash is not None else kernel_source_hash(kind),
    )  # fmt: skip
