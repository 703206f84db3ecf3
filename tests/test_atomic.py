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


def test_replacing_a_directory_never_leaves_the_target_missing(tmp_path, monkeypatch):
    """Every filesystem step of replace_dir is followed by a look at the target: it is always
    there, with the old or the new content (the swap is one renameat2 RENAME_EXCHANGE call)."""
    import os

    import ganflow.atomic as atomic

    target = tmp_path / "generator"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"v1")
    seen = []

    def watched(step):
        def call(*args, **kwargs):
            result = step(*args, **kwargs)
            seen.append((target / "w.bin").read_bytes() if target.exists() else None)
            return result

        return call

    monkeypatch.setattr(atomic, "_exchange", watched(atomic._exchange))
    monkeypatch.setattr(os, "rename", watched(os.rename))
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"v2")
    assert seen and None not in seen, seen
    assert (target / "w.bin").read_bytes() == b"v2" and sorted(p.name for p in tmp_path.iterdir()) == ["generator"]


def test_without_the_swap_the_old_directory_comes_back_when_the_rename_fails(tmp_path, monkeypatch):
    import os

    import ganflow.atomic as atomic

    target = tmp_path / "generator"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"v1")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a filesystem that cannot swap
    real_rename = os.rename

    def rename(src, dst):
        if str(dst) == str(target) and ".tmp-" in str(src):
            raise KeyboardInterrupt  # Ctrl-C between moving the old one aside and the new one in
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "w.bin").write_bytes(b"v2")
    monkeypatch.setattr(os, "rename", real_rename)
    assert (target / "w.bin").read_bytes() == b"v1" and sorted(p.name for p in tmp_path.iterdir()) == ["generator"]


def test_named_sha256_sees_renames_and_edits_not_order():
    from ganflow.atomic import named_sha256

    base = named_sha256({"a.py": b"x = 1\n", "b.py": b"y = 2\n"})
    assert base == named_sha256({"b.py": b"y = 2\n", "a.py": b"x = 1\n"})
    assert base != named_sha256({"a.py": b"x = 1\n", "c.py": b"y = 2\n"})  # renamed
    assert base != named_sha256({"a.py": b"x = 2\n", "b.py": b"y = 2\n"})  # edited
    assert base != named_sha256({"a.py": b"x = 1\ny", "b.py": b" = 2\n"})  # a byte moved across files
