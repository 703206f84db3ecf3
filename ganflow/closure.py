"""The ganflow modules a script may run: its import closure, read from the source.

Read with ``ast``, nothing is imported: every ``import ganflow.x`` / ``from ganflow.x import y``,
at module level or inside a function (a lazy import is still code the script may run), followed
transitively. Two things are derived from it: the resume key's training code
(ganflow.checkpoints) and, checked by a test, each DVC stage's code deps in dvc.yaml.
"""

from __future__ import annotations

import ast
from pathlib import Path


def import_closure(script: Path, package: Path) -> set[str]:
    """``ganflow/<name>.py`` for every module of ``package`` (the ganflow folder) that ``script``
    imports, directly or through each other."""
    seen: set[str] = set()
    todo = [Path(script)]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != "ganflow" or len(parts) < 2:
                    continue
                rel = f"ganflow/{parts[1]}.py"
                if rel not in seen and (package / f"{parts[1]}.py").is_file():
                    seen.add(rel)
                    todo.append(package / f"{parts[1]}.py")
    return seen
