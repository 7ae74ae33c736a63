"""Module boundaries the import-linter contract (pyproject.toml, run by `make lint`) cannot see: no module of the
package imports another module's private (`_`-prefixed) names. A helper two modules share is public, in a module
named for what it does."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = {".venv", "build", "tests", "docs", "tilefuse.egg-info"}


def _package_modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in SKIPPED or any(p.startswith(".") for p in parts):
            continue
        dotted = ".".join(("tilefuse", *parts))[: -len(".py")].removesuffix(".__init__")
        modules[dotted] = path
    return modules


def _imported_from(module: str, path: Path, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = module.split(".")[: -node.level if path.name != "__init__.py" else len(module.split(".")) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def private_imports() -> list[str]:
    """`importer: from module import _name` for every private name one package module imports from another."""
    modules = _package_modules()
    found = []
    for module, path in sorted(modules.items()):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _imported_from(module, path, node)
            if not source or not source.startswith("tilefuse"):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if alias.name.startswith("_") and not alias.name.startswith("__") and submodule not in modules:
                    found.append(f"{module}: from {source} import {alias.name}")
    return found


def test_the_check_sees_the_package() -> None:
    modules = _package_modules()
    assert "tilefuse.codegen.attention_fwd" in modules and "tilefuse.passes.attention" in modules
    assert not any(".tests." in name for name in modules)


def test_no_module_imports_another_modules_private_names() -> None:
    assert private_imports() == []


def test_a_private_import_is_found() -> None:
    """The check is not vacuous: the relative-import resolution finds a private name imported across modules."""
    module, path = "tilefuse.codegen.attention_fwd", ROOT / "codegen" / "attention_fwd.py"
    node = ast.parse("from .attention_tiles import _hidden").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _imported_from(module, path, node) == "tilefuse.codegen.attention_tiles"
    init = ROOT / "codegen" / "__init__.py"
    node = ast.parse("from ..passes import graph").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _imported_from("tilefuse.codegen", init, node) == "tilefuse.passes"
