"""Shared storage as a pyarrow filesystem: a local (or mounted) path, or a URI (s3://, gs://).

A module of its own so that what only moves files (the job exchange, the Ray Data copy) does not
depend on the training code that checkpoints.py names runs after."""

from __future__ import annotations

from pathlib import Path


def storage_fs(storage: str):
    """(pyarrow filesystem, base path) for a local path or a URI such as s3://bucket/prefix."""
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage).resolve())
