"""Keep torch's on-disk compile caches from replaying graphs built by another version of tilefuse.

Inductor's FX graph cache and AOTAutograd's cache key a compiled graph on its code, not on what a custom op's
autograd formula or schema was when the backward graph was traced. A cached graph from an older tilefuse can
therefore replay an old backward (one that, say, dropped a bias gradient) or call an op with a stale signature.
Inductor folds the `uuid()` of a configured custom graph pass into both keys, so the inner compile installs a
no-op post-grad pass whose uuid is a hash of tilefuse's own sources.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_SOURCE_FOLDERS = ("codegen", "compiler", "passes", "autotune")


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 over tilefuse's Python sources (the op definitions, passes and backend), computed once."""
    digest = hashlib.sha256()
    files = sorted(_PACKAGE_ROOT.glob("*.py"))
    for folder in _SOURCE_FOLDERS:
        files.extend(sorted((_PACKAGE_ROOT / folder).glob("*.py")))
    for path in files:
        digest.update(path.relative_to(_PACKAGE_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class TilefuseCacheSalt(CustomGraphPass):
    """A post-grad pass that changes nothing except the cache key; it runs the user's own pass, if any, first."""

    def __init__(self, inner: Any = None) -> None:
        self.inner: tuple[Any, ...] = tuple(inner) if isinstance(inner, (list, tuple)) else (inner,) if inner else ()

    def __call__(self, graph: torch.fx.graph.Graph) -> None:
        for user_pass in self.inner:
            user_pass(graph)

    def uuid(self) -> Any | None:
        inner_uuids = tuple(p.uuid() if hasattr(p, "uuid") else None for p in self.inner)
        # A user pass without a uuid makes Inductor skip its cache; keep that.
        return None if None in inner_uuids else ("tilefuse", source_hash(), *inner_uuids)


@contextlib.contextmanager
def salted_inductor_cache() -> Iterator[None]:
    """Within the block, Inductor's and AOTAutograd's cache keys include tilefuse's source hash."""
    import torch._inductor.config as inductor_config

    current = inductor_config.post_grad_custom_post_pass
    if isinstance(current, TilefuseCacheSalt):
        yield
        return
    with inductor_config.patch(post_grad_custom_post_pass=TilefuseCacheSalt(current)):
        yield
