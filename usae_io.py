"""Durable files: the one atomic writer, directory fsync and the hashes of the project.

Every file the project writes (checkpoints, caches, converted weights, metrics) goes through
:func:`atomic_write`, so a crash at any moment leaves the old file or the new one, never half of
one. This module imports nothing of the project.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file under the current umask.

    ``mkstemp`` makes owner-only files; a cache or checkpoint is often shared with colleagues.
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where the platform cannot)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def writable_error(path: str | os.PathLike, error: OSError, hint: str = "") -> OSError:
    """An ``OSError`` that names ``path`` and says what to do about a storage failure."""
    return OSError(error.errno, f"cannot write {path}: {error.strerror or error}; choose a "
                   f"writable folder with free space{hint}.")


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[Path], None]) -> None:
    """Write ``content`` (bytes, text, or a function that writes a given path) to ``path``.

    The data go to a temporary file beside ``path``, which is fsynced and renamed over it; a
    storage failure raises an ``OSError`` naming ``path`` and leaves ``path`` as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise writable_error(path, error) from error
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        if callable(content):
            content(tmp)
        else:
            tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and str(path) not in str(error):
            raise writable_error(path, error) from error
        raise


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files that a killed :func:`atomic_write` of ``path`` left behind."""
    path = Path(path)
    return [p for p in path.parent.glob(".*.tmp") if p.name.startswith(f".{path.name}.")]


def sha256_json(value: Any) -> str:
    """sha256 of ``value`` in a canonical JSON form (sorted keys, no spaces): a content hash."""
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
