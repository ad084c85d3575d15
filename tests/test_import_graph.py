"""The import graph is a tree of layers: model ← tasks/common ← tasks/sources and the stages ← flows.

Every import statement counts (top-level, inside functions, under TYPE_CHECKING): a lazy import is still a
dependency. A stage never imports another stage (they meet through the files dvc.yaml declares), tasks/common never
imports upwards (config.py finds a stage's Config by name at run time, the one deliberate exception), and no
module imports one that imports it back.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (None for third-party and standard-library modules)."""
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


@functools.cache
def imports_of(path: Path) -> frozenset[Path]:
    """The project files `path` imports, at any level of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(f for f in map(module_file, names) if f is not None and f != path)
    return frozenset(found)


def reached(path: Path) -> set[Path]:
    """Every project file `path` imports, transitively (itself included)."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(imports_of(current))
    return seen


def layer(path: Path) -> tuple[int, str]:
    """(level, kind): a module may import its own level or below; kind "stage" never imports another stage."""
    rel = path.relative_to(ROOT).parts
    if rel[0] == "model":
        return 0, "model"
    if rel[:2] == ("tasks", "common"):
        return 1, "common"
    if rel[:2] == ("tasks", "sources"):
        return 2, "sources"
    if rel[0] == "tasks":
        return 3, "stage"
    return 4, rel[0]


def project_modules() -> list[Path]:
    return sorted(p for d in ("model", "tasks", "flows") for p in (ROOT / d).rglob("*.py"))


def test_imports_point_one_way():
    wrong = []
    for path in project_modules():
        level, kind = layer(path)
        for target in imports_of(path):
            t_level, t_kind = layer(target)
            if t_level > level or (kind == t_kind == "stage"):
                wrong.append(f"{path.relative_to(ROOT)} imports {target.relative_to(ROOT)}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    cycles = [p.relative_to(ROOT).as_posix() for p in project_modules() if any(p in reached(q) for q in imports_of(p))]
    assert not cycles, f"modules on an import cycle: {cycles}"
