"""TileConfig: the launch knobs of every kernel family, and its plain-dict form (what tuning databases store).

The stored dict format is fixed: records written by earlier versions must still be read (`config_from_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

PARAMS: tuple[str, ...] = ("block_m", "block_n", "num_warps", "num_stages", "num_splits")
HEURISTIC_SPLITS = 0  # num_splits as stored in dicts and search choices when the launcher's heuristic picks it


class AttentionKnobs(TypedDict, total=False):
    """The knobs the FA2 forward and backward launchers take (`TileConfig.attention_knobs`); a knob left out takes
    the launcher's default."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class DecodeKnobs(TypedDict, total=False):
    """The knobs the split-KV decode launcher takes (`TileConfig.decode_knobs`); a knob left out takes the
    launcher's default."""

    block_n: int
    num_splits: int | None
    num_warps: int
    num_stages: int


class NormKnobs(TypedDict, total=False):
    """The knobs the norm forward launcher takes (`TileConfig.norm_knobs`): the row block and warps."""

    block: int
    num_warps: int


class NormBackwardKnobs(NormKnobs, total=False):
    """The norm backward launcher's knobs (`TileConfig.norm_backward_knobs`): the forward's and its program count."""

    programs: int | None


class RopeKnobs(TypedDict, total=False):
    """The knobs the RoPE launchers (forward and backward) take (`TileConfig.rope_knobs`)."""

    block_rows: int
    num_warps: int


@dataclass(frozen=True)
class TileConfig:
    """Launch knobs; a plan describes exactly the knobs it is given (each kernel family's `default_config` gives
    its launcher's defaults).

    Which knobs each kernel family reads (the others are ignored and kept at their defaults by the search spaces):
    attention forward and backward: block_m, block_n, num_warps, num_stages (the backward applies them to both its
    dK/dV and dQ kernel); decode: block_n, num_warps, num_stages, num_splits (its rows are the GQA group's query
    rows; num_splits None means its heuristic); norm: num_warps and block_n as the row block (columns a row program
    holds at once, a power of two: a wider row runs the chunked kernels, block_n columns per chunk; the TileConfig
    default 64 chunks any row wider than 64, so plan a norm with its family's `default_config`); norm backward: the
    same and num_splits as its program count (None: 132, H100's SMs); RoPE: block_m as rows per program,
    num_warps. block_m/block_n are requests for attention: the launcher shrinks them to the problem
    (max(16, min(block, next_pow2(N))))."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None

    def attention_knobs(self) -> AttentionKnobs:
        """The keyword arguments of the FA2 forward and backward launchers."""
        return AttentionKnobs(block_m=self.block_m, block_n=self.block_n, num_warps=self.num_warps,
                              num_stages=self.num_stages)  # fmt: skip

    def decode_knobs(self) -> DecodeKnobs:
        """The keyword arguments of the split-KV decode launcher."""
        return DecodeKnobs(block_n=self.block_n, num_splits=self.num_splits, num_warps=self.num_warps,
                           num_stages=self.num_stages)  # fmt: skip

    def norm_knobs(self) -> NormKnobs:
        """The keyword arguments of the norm forward launcher (block_n is its row block)."""
        return NormKnobs(block=self.block_n, num_warps=self.num_warps)

    def norm_backward_knobs(self) -> NormBackwardKnobs:
        """The keyword arguments of the norm backward launcher (num_splits is its program count)."""
        return NormBackwardKnobs(block=self.block_n, num_warps=self.num_warps, programs=self.num_splits)

    def rope_knobs(self) -> RopeKnobs:
        """The keyword arguments of the RoPE launchers (block_m is rows per program)."""
        return RopeKnobs(block_rows=self.block_m, num_warps=self.num_warps)


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
