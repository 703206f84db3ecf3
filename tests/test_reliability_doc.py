"""docs/RELIABILITY.md: every row names a test, and every test it names exists."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO


def test_every_row_names_an_existing_test():
    text = (REPO / "docs" / "RELIABILITY.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| ---", "| fault"))]
    assert len(rows) >= 30
    missing_test = [
        row[:80] for row in rows if "tests/" not in row and "same test" not in row and "not tested" not in row
    ]
    assert not missing_test, missing_test

    names: dict[str, set[str]] = {}
    refs = re.findall(r"tests/([\w/]+\.py)::(\w+)", text)
    assert refs
    for file, name in refs:
        if file not in names:
            tree = ast.parse((REPO / "tests" / file).read_text())
            names[file] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in names[file], f"tests/{file}::{name} is named in docs/RELIABILITY.md but does not exist"
