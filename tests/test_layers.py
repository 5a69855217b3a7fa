"""The house's layers, read off the imports: the app factory and the API reference on top,
then the blueprints (bloom/api/), then the web layer (bloom/web/), then the domain's areas
and what they stand on. No import runs back up."""
from __future__ import annotations

import ast
from pathlib import Path

BLOOM = Path(__file__).resolve().parent.parent / "bloom"
TOP = {"bloom.app", "bloom.api_reference"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(BLOOM.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every bloom module this file imports, at any depth of the file (TYPE_CHECKING aside)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                 for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{target}.{alias.name}" for alias in node.names)
            if target != "bloom":  # `from .. import metrics` imports bloom.metrics, not the package's lazy names
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "bloom" or name.startswith("bloom.")}


def _layer(module: str) -> int:
    if module in TOP or module == "bloom":
        return 3
    if module.startswith("bloom.api.") or module == "bloom.api":
        return 2
    if module.startswith("bloom.web.") or module == "bloom.web":
        return 1
    return 0


def test_no_import_runs_back_up():
    upward = []
    for path in sorted(BLOOM.rglob("*.py")):
        module = _module_name(path)
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)


def test_the_walk_sees_the_layers():
    assert "bloom.web.guards" in _imports(BLOOM / "api" / "tasks.py")
    assert _layer("bloom.web.guards") > _layer("bloom.leases.service")
