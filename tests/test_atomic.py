"""Atomic outputs: an error or Ctrl-C mid-write leaves the previous version whole."""

from __future__ import annotations

import pytest

from ganflow.atomic import atomic_dir, write_file


def test_write_file_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "metrics.json"
    write_file(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode

    import os

    def broken_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        write_file(target, b"partial")
    assert target.read_text() == '{"a": 1}\n'
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temporary left


def test_atomic_dir_keeps_the_old_directory_on_error(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w.bin").write_bytes(b"v2-half")
            raise RuntimeError("crash mid-export")
    assert (target / "w.bin").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"v2")
    assert (target / "w.bin").read_bytes() == b"v2" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
