"""Atomic outputs: a reader (or an interrupted run) sees the old version or the new one, never half.

Files and directories are written next to their target under a temporary name, then renamed
into place (a rename within one filesystem is atomic).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ganflow.errors import GanflowError

if TYPE_CHECKING:
    from ganflow.config import Config


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: Path, payload: bytes) -> None:
    """Write a file durably (flushed and fsynced) in place; use inside ``atomic_dir``."""
    with open(path, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def write_file(path: Path, payload: bytes | str) -> None:
    """Replace ``path`` atomically with ``payload`` (text is written as UTF-8)."""
    data = payload.encode() if isinstance(payload, str) else payload
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one step


def _exchange(a: Path, b: Path) -> bool:
    """Swap paths ``a`` and ``b`` atomically (Linux renameat2 RENAME_EXCHANGE). False where the
    system or the filesystem cannot (not Linux, an old kernel or libc, a filesystem without it)."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a crash after it cannot bring the old entry back)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``. An existing ``target`` is swapped with ``new`` in one
    step, so a reader always finds one of the two whole; where the filesystem cannot swap, the old
    one is renamed aside first (a window without ``target``) and restored if the second rename
    fails. The parent is fsynced."""
    new, target = Path(new), Path(target)
    if target.exists() and _exchange(new, target):
        _fsync_dir(target.parent)
        shutil.rmtree(new, ignore_errors=True)  # it holds the old version now
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target``; on success it replaces ``target``,
    on any error (Ctrl-C included) it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable_dir(path: Path, key: str) -> None:
    """Refuse, with one line naming ``key``, a local directory that cannot be created or
    written: a file in the way, a read-only mount, no permission. Nothing is left behind.

    The directory itself need not exist yet: its nearest existing ancestor is what gets tried
    (with a real temporary file, since permission bits say nothing about read-only mounts).
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is" if probe == path else f"is under {probe}, which is"
        raise GanflowError(f"{key}: {path} {what} a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".ganflow-write-check-"):
            pass
    except OSError as exc:
        where = "" if probe == path else f" ({probe} cannot be written)"
        raise GanflowError(f"{key}: {path} is not writable{where}: {exc.strerror or exc}") from None


def check_storage_writable(cfg: Config) -> None:
    """Fail before Ray starts when Ray Train could not write its checkpoints:
    cluster.storage_path, else paths.ray_results. A URI (s3://, gs://, ...) is left to Ray."""
    if cfg.cluster.storage_path is None:
        check_writable_dir(cfg.paths.ray_results, "paths.ray_results")
    elif "://" not in cfg.cluster.storage_path:
        check_writable_dir(Path(cfg.cluster.storage_path), "cluster.storage_path")


def sha256_hex(*chunks: bytes) -> str:
    """sha256 of the concatenated ``chunks``."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def named_sha256(entries: dict[str, bytes]) -> str:
    """sha256 of named contents (file name -> bytes): a rename or an edit changes it, the
    dict's order does not."""
    digest = hashlib.sha256()
    for name in sorted(entries):
        digest.update(name.encode() + b"\0" + hashlib.sha256(entries[name]).digest())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
