"""A small MLIR reading interface over the bindings bundled with Triton (`triton._C.libtriton.ir`).

PyPI's `mlir-python-bindings` is a placeholder, so the TTGIR is parsed with Triton's own MLIR build, which knows the
tt/ttg/ttng dialects. Everything the cost model reads goes through `parse_module` and `MlirOp`; swapping in upstream
bindings means reimplementing this file only.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SHAPE = re.compile(r"<(\d+(?:x\d+)*)x[!a-z]")


def _shape_of(type_text: str) -> tuple[int, ...]:
    """Static shape of a tensor/memdesc type string ("tensor<128x32xbf16, ...>" → (128, 32)); () for scalars."""
    match = _SHAPE.search(type_text)
    return tuple(int(d) for d in match.group(1).split("x")) if match else ()


@dataclass(frozen=True)
class MlirOp:
    """One operation: its name ("ttng.warp_group_dot"), operand and result types as text, and their shapes."""

    name: str
    operand_types: tuple[str, ...]
    result_types: tuple[str, ...]

    @property
    def dialect(self) -> str:
        return self.name.split(".", 1)[0]

    def operand_shape(self, index: int) -> tuple[int, ...]:
        return _shape_of(self.operand_types[index])

    def result_shape(self, index: int = 0) -> tuple[int, ...]:
        return _shape_of(self.result_types[index])


class MlirModule:
    """A parsed module: its operations in MLIR's walk order (post-order) and the module's integer attributes."""

    def __init__(self, ops: list[MlirOp], attributes: dict[str, int]) -> None:
        self.ops = ops
        self.attributes = attributes

    def __iter__(self) -> Iterator[MlirOp]:
        return iter(self.ops)

    def op_counts(self) -> Counter[str]:
        return Counter(op.name for op in self.ops)

    def find(self, *names: str) -> list[MlirOp]:
        return [op for op in self.ops if op.name in names]


def _context() -> Any:
    from triton._C.libtriton import ir, nvidia

    context = ir.context()
    ir.load_dialects(context)
    nvidia.load_dialects(context)  # ttng (Hopper wgmma, TMA, fences) lives in the NVIDIA backend
    return context


def _types(values: Any, count: int) -> tuple[str, ...]:
    return tuple(str(values(i).get_type()) for i in range(count))


def parse_module(text: str, int_attributes: tuple[str, ...] = ("ttg.num-warps", "ttg.num-ctas")) -> MlirModule:
    """Parse MLIR text (TTIR or TTGIR as Triton prints it) and walk it; raises ValueError when it does not parse."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be non-empty MLIR source")
    from triton._C.libtriton import ir

    context = _context()
    with tempfile.TemporaryDirectory() as tmp:  # the bundled parser reads from a file, not from a string
        path = Path(tmp) / "module.mlir"
        path.write_text(text)
        try:
            module = ir.parse_mlir_module(str(path), context)
        except RuntimeError as err:
            raise ValueError(f"MLIR text does not parse: {err}") from err
    ops: list[MlirOp] = []

    def visit(op: Any) -> None:
        operands = _types(op.get_operand, op.get_num_operands())
        results = _types(op.get_result, op.get_num_results())
        ops.append(MlirOp(op.get_name(), operands, results))

    module.walk(visit)
    attributes: dict[str, int] = {}
    for name in int_attributes:
        try:
            attributes[name] = int(module.get_int_attr(name))
        except (RuntimeError, TypeError, ValueError):  # the attribute is absent
            continue
    return MlirModule(ops, attributes)
