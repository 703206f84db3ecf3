"""The suite's own rules, as conftest applies them at collection (nothing starts)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests import conftest


def fake_item(module: str, fixtures: dict[str, str]):
    """A collected test in ``module`` using ``fixtures`` (name -> scope), recording its marks."""
    marks = []
    defs = {name: [SimpleNamespace(scope=scope)] for name, scope in fixtures.items()}
    return SimpleNamespace(
        fixturenames=list(fixtures),
        _fixtureinfo=SimpleNamespace(name2fixturedefs=defs),
        module=SimpleNamespace(__name__=module),
        keywords={},
        add_marker=marks.append,
        marks=marks,
    )


def test_tests_sharing_a_module_fixture_form_one_xdist_group_and_others_none():
    swept = fake_item("tests.test_x", {"swept": "module", "tmp_path": "function", "tmp_path_factory": "session"})
    plain = fake_item("tests.test_x", {"tmp_path": "function", "tmp_path_factory": "session"})
    ray = fake_item("tests.test_y", {"two_nodes": "function"})
    conftest.pytest_collection_modifyitems(None, [swept, plain, ray])

    def groups(item) -> list:
        return [m.args for m in item.marks if isinstance(m, pytest.MarkDecorator) and m.name == "xdist_group"]

    assert groups(swept) == [("tests.test_x",)]
    assert groups(plain) == []  # a session-scoped fixture (tmp_path's factory) does not group
    assert ray.marks == ["ray"]  # its fixture's mark only
