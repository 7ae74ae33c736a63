"""Emit each launched kernel as its own Triton source file, specialized to one plan, cached by content hash.

A kernel family is written once as a generic `@triton.jit` function whose `tl.constexpr` parameters select the
variant (causal, mask kind, RoPE layout, block sizes, ...). `specialize` bakes the literal values of those
parameters into a copy of the source: the parameters leave the signature, their uses become literals, and every
`if` / conditional expression they decide is folded, so the emitted file holds only the code the variant runs —
comments kept — and reads like a hand-written kernel for that one case. The file is named by the SHA-256 of its
text, written atomically under the cache folder, imported, and memoized; set TILEFUSE_DUMP_KERNELS (or call
`set_dump_dir`) to get a copy of every emitted kernel in a folder of your choice.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import io
import logging
import os
import shutil
import sys
import tempfile
import textwrap
import threading
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton

log = logging.getLogger("tilefuse.codegen")

_LITERAL_TYPES = (bool, int, float, str, type(None))
_STATIC_NODES = (
    ast.Expression, ast.Constant, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd,
    ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.BinOp, ast.Add, ast.Sub, ast.Mult,
    ast.FloorDiv, ast.Mod, ast.BitAnd, ast.BitOr, ast.BitXor,
)  # fmt: skip
_lock = threading.Lock()
_memo: dict[tuple[Any, ...], EmittedKernel] = {}
_dump_dir: Path | None = None
_constexpr_cache: dict[int, tuple[Any, tuple[str, ...]]] = {}  # id(kernel) -> (kernel, names); launch is hot
_launch_memo: dict[tuple[Any, ...], EmittedKernel] = {}


@dataclass(frozen=True)
class EmittedKernel:
    """One specialized kernel: its source, content hash, file and the @triton.jit function loaded from it."""

    name: str
    source: str
    digest: str
    path: Path
    kernel: Any  # triton JITFunction (or the interpreter's InterpretedFunction under TRITON_INTERPRET=1)
    baked: dict[str, Any]


def cache_dir() -> Path:
    """TILEFUSE_CACHE_DIR (default ~/.cache/tilefuse) / kernels."""
    root = os.environ.get("TILEFUSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tilefuse")
    return Path(root) / "kernels"


def set_dump_dir(path: str | os.PathLike[str] | None) -> None:
    """Copy every kernel emitted from now on (and every one already emitted) into `path`; None stops dumping."""
    global _dump_dir
    _dump_dir = None if path is None else Path(path)
    if _dump_dir is not None:
        for emitted in list(_memo.values()):
            _dump(emitted)


def _current_dump_dir() -> Path | None:
    env = os.environ.get("TILEFUSE_DUMP_KERNELS")
    return Path(env) if env else _dump_dir


def constexpr_names(kernel: Any) -> list[str]:
    """Names of the kernel's `tl.constexpr` parameters, in signature order (read once per kernel)."""
    names = _constexpr_cache.get(id(kernel))
    if names is None or names[0] is not kernel:
        found = [p.name for p in kernel.params if p.is_constexpr] if hasattr(kernel, "params") else _annotated(kernel)
        names = _constexpr_cache[id(kernel)] = (kernel, tuple(found))
    return list(names[1])


def _annotated(kernel: Any) -> list[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn)))
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    return [a.arg for a in func.args.args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)]


# ------------------------------------------------------------------------------------------- source rewriting
def _signature_end(lines: list[str]) -> int:
    """Index of the line holding the `:` that closes the `def ...(...)` header."""
    depth = 0
    seen_def = False
    tokens = tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline)
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.string == "def":
            seen_def = True
        elif seen_def and tok.type == tokenize.OP:
            depth += tok.string in "([{"
            depth -= tok.string in ")]}"
            if tok.string == ":" and depth == 0:
                return tok.start[0] - 1
    raise ValueError("no function header found")


def _signature(name: str, params: Sequence[str], constexprs: set[str]) -> list[str]:
    """A `def` header listing `params`, wrapped at 100 columns, constexprs annotated."""
    parts = [f"{p}: tl.constexpr" if p in constexprs else p for p in params]
    lines, line = [], "   "
    for part in parts:
        if len(line) + len(part) + 2 > 100:
            lines.append(line.rstrip())
            line = "   "
        line += f" {part},"
    lines.append(line)
    return [f"def {name}(", *lines, "):"]


def _substitute(body: str, values: dict[str, Any]) -> str:
    """Replace loads of the baked names with their literals (not attribute names or keyword argument names)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(body).readline))
    out: list[tokenize.TokenInfo] = []
    for i, tok in enumerate(tokens):
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        before = tokens[i - 1].string if i else ""
        if tok.type == tokenize.NAME and tok.string in values and before != "." and after != "=":
            tok = tok._replace(string=repr(values[tok.string]))
        out.append(tok)
    return tokenize.untokenize(out)


def _static(node: ast.expr) -> tuple[bool, Any]:
    """(True, value) when the expression holds only literals and operators."""
    expr = ast.Expression(node)
    if not all(isinstance(n, _STATIC_NODES) for n in ast.walk(expr)):
        return False, None
    return True, eval(compile(expr, "<static>", "eval"), {"__builtins__": {}})  # literals and operators only


def _block_lines(stmts: list[ast.stmt], start: int) -> tuple[int, int]:
    """First and last (0-based) source line of a statement list, leading comment lines from `start` included."""
    return start, stmts[-1].end_lineno - 1  # type: ignore[operator]


def _fold_once(lines: list[str]) -> list[str] | None:
    """Fold the first `if` (statement or single-line expression) whose test is static; None when none is left."""
    tree = ast.parse("\n".join(lines))
    for node in ast.walk(tree):
        if isinstance(node, ast.IfExp) and node.lineno == node.end_lineno:
            ok, value = _static(node.test)
            if ok:
                row, line = node.lineno - 1, lines[node.lineno - 1]
                branch = node.body if value else node.orelse
                chosen = line[branch.col_offset : branch.end_col_offset]
                folded = f"{line[: node.col_offset]}({chosen}){line[node.end_col_offset :]}"
                return [*lines[:row], folded, *lines[row + 1 :]]
        if isinstance(node, ast.If):
            ok, value = _static(node.test)
            if ok:
                return _fold_if(lines, tree, node, bool(value))
    return None


def _fold_if(lines: list[str], tree: ast.Module, node: ast.If, value: bool) -> list[str]:
    first, last = node.lineno - 1, node.end_lineno - 1  # type: ignore[operator]
    indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
    if lines[first].lstrip().startswith("elif"):  # the outer `if` is not static (a static one promotes its elif)
        return _fold_elif(lines, node, value, indent)
    kept: list[str] = []
    if value:
        start, end = _block_lines(node.body, node.lineno)
        kept = textwrap.dedent("\n".join(lines[start : end + 1])).splitlines()
    elif node.orelse:
        orelse = node.orelse[0]
        if isinstance(orelse, ast.If) and lines[orelse.lineno - 1].lstrip().startswith("elif"):
            # `elif c:` ... becomes `if c:` ... at the same indentation; it is folded in turn if c is static.
            promoted = indent + lines[orelse.lineno - 1].lstrip().removeprefix("el")
            return [*lines[:first], promoted, *lines[orelse.lineno : last + 1], *lines[last + 1 :]]
        else:
            start, end = _block_lines(node.orelse, _else_line(lines, node) + 1)
            kept = textwrap.dedent("\n".join(lines[start : end + 1])).splitlines()
    if not kept and _only_statement(tree, node):
        kept = ["pass"]
    return [*lines[:first], *(indent + k if k.strip() else k for k in kept), *lines[last + 1 :]]


def _fold_elif(lines: list[str], node: ast.If, value: bool, indent: str) -> list[str]:
    """Fold a static `elif` of an `if` that stays: a true one becomes the chain's `else:` (what follows it can no
    longer run), a false one leaves the chain and hands on to its own `elif`/`else`, if any."""
    first, last = node.lineno - 1, node.end_lineno - 1  # type: ignore[operator]
    if value:
        body_end = node.body[-1].end_lineno - 1  # type: ignore[operator]
        return [*lines[:first], indent + "else:", *lines[first + 1 : body_end + 1], *lines[last + 1 :]]
    if not node.orelse:
        return [*lines[:first], *lines[last + 1 :]]
    following = node.orelse[0]
    if isinstance(following, ast.If) and lines[following.lineno - 1].lstrip().startswith("elif"):
        return [*lines[:first], *lines[following.lineno - 1 :]]
    return [*lines[:first], *lines[_else_line(lines, node) :]]


def _else_line(lines: list[str], node: ast.If) -> int:
    """0-based line of the `else:` of an if statement."""
    row = node.orelse[0].lineno - 2
    while not lines[row].lstrip().startswith("else"):
        row -= 1
    return row


def _only_statement(tree: ast.Module, node: ast.If) -> bool:
    for parent in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(parent, field, None)
            if isinstance(block, list) and node in block:
                return len(block) == 1
    return False


def specialized_source(kernel: Any, baked: dict[str, Any]) -> str:
    """The kernel's source with `baked` constexprs turned into literals and the branches they decide folded."""
    fn = kernel.fn
    lines = textwrap.dedent(inspect.getsource(fn)).splitlines()
    while lines and lines[0].lstrip().startswith("@"):
        lines.pop(0)  # decorators: the emitted module applies @triton.jit itself
    header_end = _signature_end(lines)
    params = list(inspect.signature(fn).parameters)
    constexprs = set(constexpr_names(kernel))
    header = _signature(fn.__name__, [p for p in params if p not in baked], constexprs)
    body = _substitute("\n".join(lines[header_end + 1 :]) + "\n", baked).splitlines()
    source = [*header, *body]
    while (folded := _fold_once(source)) is not None:
        source = folded
    return "\n".join(source) + "\n"


def _module_source(kernel: Any, function_source: str, baked: dict[str, Any]) -> str:
    fn = kernel.fn
    tree = ast.parse(function_source)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    imports = sorted(name for name in used if name in fn.__globals__ and name not in ("tl", "triton"))
    spec = ", ".join(f"{k}={v!r}" for k, v in baked.items())
    lines = [
        f'"""{fn.__name__} from {fn.__module__}, emitted by tilefuse for: {spec}."""',
        "",
        "import triton",
        "import triton.language as tl",
        *([f"from {fn.__module__} import {', '.join(imports)}"] if imports else []),
        "",
        "",
        "@triton.jit",
        function_source,
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ files and loading
def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _materialize(name: str, source: str) -> tuple[str, Path]:
    """(digest, file) for `source`; a cached file whose text does not hash to its name is rewritten."""
    digest = hashlib.sha256(f"{triton.__version__}\n{source}".encode()).hexdigest()
    path = cache_dir() / f"{name}_{digest[:20]}.py"
    try:
        current = path.read_text(encoding="utf-8")
    except OSError:
        current = None
    if current != source:
        if current is not None:
            log.warning("kernel cache file %s does not match its hash; rewriting it", path)
        _write_atomic(path, source)
    return digest, path


def _load(name: str, path: Path) -> Any:
    module_name = f"tilefuse_kernels.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton's JIT and inspect find the source through the module
    spec.loader.exec_module(module)
    return getattr(module, name)


def _dump(emitted: EmittedKernel) -> None:
    target = _current_dump_dir()
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(emitted.path, target / emitted.path.name)


def specialize(kernel: Any, constexprs: dict[str, Any]) -> EmittedKernel:
    """The emitted kernel for these constexpr values (literal ones are baked in, others stay parameters)."""
    names = set(constexpr_names(kernel))
    unknown = set(constexprs) - names
    if unknown:
        raise ValueError(f"{kernel.fn.__name__} has no constexpr parameter(s) {sorted(unknown)}")
    baked = {k: v for k, v in constexprs.items() if isinstance(v, _LITERAL_TYPES)}
    key = (kernel, tuple(sorted(baked.items(), key=lambda kv: kv[0])), os.environ.get("TRITON_INTERPRET", "0"))
    with _lock:
        emitted = _memo.get(key)
        if emitted is None:
            name = kernel.fn.__name__
            source = _module_source(kernel, specialized_source(kernel, baked), baked)
            digest, path = _materialize(name, source)
            emitted = EmittedKernel(name, source, digest, path, _load(name, path), baked)
            _memo[key] = emitted
            _dump(emitted)
        elif _current_dump_dir() is not None:
            _dump(emitted)
    return emitted


def launch(kernel: Any, grid: tuple[int, ...] | Callable[..., tuple[int, ...]], *args: Any, **kwargs: Any) -> Any:
    """`kernel[grid](*args, **kwargs)` through the kernel specialized to the constexprs given in kwargs."""
    names = constexpr_names(kernel)
    constexprs = {k: v for k, v in kwargs.items() if k in names}
    # Fast path: a call site passes its constexprs in a fixed order, so this key repeats launch after launch.
    fast_key = (id(kernel), tuple(constexprs.items()), os.environ.get("TRITON_INTERPRET", "0"))
    emitted = _launch_memo.get(fast_key)
    if emitted is None or _current_dump_dir() is not None:
        emitted = specialize(kernel, constexprs)
        _launch_memo[fast_key] = emitted
    rest = {k: v for k, v in kwargs.items() if k not in emitted.baked}
    return emitted.kernel[grid](*args, **rest)
