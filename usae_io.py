"""Durable files: the one atomic writer, directory fsync, the hashes and the one-writer lock.

Every file the project writes (checkpoints, caches, converted weights, metrics) goes through
:func:`atomic_write`, so a crash at any moment leaves the old file or the new one, never half of
one; :func:`exclusive` keeps a second, unrelated process out of a cache or checkpoint that one
is writing. This module imports nothing of the project.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator


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


# ----------------------------------------------------------------------------------------------
# One writer at a time


class BusyError(RuntimeError):
    """Another live process holds the lock of what this one was about to write."""


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, Linux), to tell it from a later process
    that reused its number; None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(holder: dict) -> bool:
    """Whether the process recorded in a lock still runs (assumed, on another host)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    start = _process_start(int(holder["pid"]))
    return start is None or holder.get("process_start") in (None, start)


def _torchrun_job() -> str | None:
    """The job this process is a rank of, or None. Its rendezvous id alone does not tell jobs
    apart (torchrun's default is "none"); with the master's address and port it does while the
    job runs, since no two jobs listen on one port."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env and "WORLD_SIZE" not in env:
        return None
    return f"{env.get('TORCHELASTIC_RUN_ID')} {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file ``lock`` while ``what`` (e.g. "building the activation cache") runs.

    A second process asking for the same lock gets a :class:`BusyError` naming the holder (pid,
    host, start time) and what to do; the ranks of one ``torchrun`` job (the same rendezvous id,
    master address and port) and the holder itself share it. The holder keeps an ``flock`` on
    the file, which the kernel drops when the process dies however it dies: a lock left by a
    killed process never blocks a resume, and taking it over rewrites the file under that
    ``flock`` instead of deleting it, so two processes cannot both take over one stale lock.
    """
    lock = Path(lock)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
          "process_start": _process_start(os.getpid()),
          "job": _torchrun_job()}
    for attempt in range(50):
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as error:
            raise writable_error(lock, error) from error
        try:
            held = _try_flock(fd)
            if held is None:  # a file system without flock: judge the recorded holder
                holder = _holder(fd)
                held = not holder or not _running(holder) or holder.get("pid") == me["pid"]
            same_file = os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            raise
        if held and not same_file:  # released and deleted between our open and our flock
            os.close(fd)
            continue
        if held:
            break
        holder = _holder(fd)
        os.close(fd)
        if not holder:  # its holder is writing it this instant
            time.sleep(0.05)
            continue
        ours = (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"])
        if ours or (me["job"] is not None and holder.get("job") == me["job"]):
            yield  # already held by this process or its job: the first holder releases it
            return
        raise BusyError(
            f"{lock.parent} is in use: process {holder.get('pid')} on {holder.get('host')} "
            f"has been {holder.get('what')} since {holder.get('started')}. Wait for it to "
            f"finish or stop it; if no such process runs any more, delete {lock}.")
    else:
        raise BusyError(f"could not take the lock {lock}; delete it if no process uses "
                        f"{lock.parent}.")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        yield
    finally:
        # Delete, then unlock: a process that opened the old file meanwhile sees it is gone.
        lock.unlink(missing_ok=True)
        os.close(fd)


def _try_flock(fd: int) -> bool | None:
    """Take an exclusive flock without waiting: True, False (another holds it), or None where
    the file system has no flock."""
    import fcntl  # POSIX only, like the rest of this project's file handling

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise


def _holder(fd: int) -> dict:
    """The holder recorded in an open lock file; {} while it is empty or half-written."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
