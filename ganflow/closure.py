"""The ganflow modules a script may run: its import closure, read from the source.

Read with ``ast``, nothing is imported: every ``import ganflow.x`` / ``from ganflow.x import y`` /
``from ganflow import x``, at module level or inside a function (a lazy import is still code the
script may run), followed transitively. Two things are derived from it: the resume key's
training code (ganflow.checkpoints) and, checked by a test, each DVC stage's code deps in dvc.yaml.
"""

from __future__ import annotations

import ast
from pathlib import Path


def direct_imports(script: Path, package: Path, lazy: bool = True) -> set[str]:
    """The names of the modules of ``package`` (the ganflow folder) that ``script`` imports itself;
    with ``lazy`` false only those imported at module level (what runs at import)."""
    tree = ast.parse(Path(script).read_text())
    found: set[str] = set()
    for node in ast.walk(tree) if lazy else tree.body:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "ganflow" and len(parts) >= 2 and (package / f"{parts[1]}.py").is_file():
                found.add(parts[1])
    return found


def import_closure(script: Path, package: Path) -> set[str]:
    """``ganflow/<name>.py`` for every module of ``package`` that ``script`` imports, directly or
    through each other."""
    seen: set[str] = set()
    todo = [Path(script)]
    while todo:
        for name in direct_imports(todo.pop(), package) - seen:
            seen.add(name)
            todo.append(package / f"{name}.py")
    return {f"ganflow/{name}.py" for name in seen}
