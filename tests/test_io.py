"""Tests of usae_io: the one atomic writer, the hashes and the one-writer lock."""
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

import usae_io


@pytest.mark.parametrize("content, expected", [(b"\x00bytes", b"\x00bytes"),
                                               ("text é", "text é".encode()),
                                               (lambda tmp: tmp.write_bytes(b"by a writer"),
                                                b"by a writer")])
def test_atomic_write_takes_bytes_text_or_a_writer(tmp_path, content, expected):
    path = tmp_path / "deep" / "file.bin"  # missing folders are made
    usae_io.atomic_write(path, content)
    assert path.read_bytes() == expected
    assert path.stat().st_mode & 0o777 == usae_io.file_mode()
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]


def test_a_failed_write_keeps_the_old_file_names_it_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    usae_io.atomic_write(path, b"old")

    def half_then_full_disk(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {path}.*free space") as error:
        usae_io.atomic_write(path, half_then_full_disk)
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_a_writer_error_that_is_not_about_storage_passes_through(tmp_path):
    def broken(tmp):
        raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data"):
        usae_io.atomic_write(tmp_path / "x", broken)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write .*not_a_folder"):
        usae_io.atomic_write(blocker / "file", b"x")


def test_stale_temporaries_are_those_of_the_given_file_only(tmp_path):
    path = tmp_path / "usae.safetensors"
    mine = tmp_path / ".usae.safetensors.k1ll3d.tmp"
    other = tmp_path / ".other.safetensors.x.tmp"
    for p in (mine, other):
        p.write_bytes(b"half")
    assert usae_io.stale_temporaries(path) == [mine]


def test_sha256_json_is_canonical():
    a = usae_io.sha256_json({"b": [1, 2], "a": "é"})
    assert a == usae_io.sha256_json({"a": "é", "b": [1, 2]})  # key order does not matter
    assert a == hashlib.sha256('{"a":"é","b":[1,2]}'.encode()).hexdigest()
    assert a != usae_io.sha256_json({"a": "é", "b": [2, 1]})


def test_sha256_file_reads_in_blocks(tmp_path):
    path = tmp_path / "big"
    data = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(data)
    assert usae_io.sha256_file(path) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# One writer at a time

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
import usae_io
with usae_io.exclusive({lock!r}, "holding the lock for a test"):
    print("held", flush=True)
    time.sleep(120)
"""


def holder(lock, env=None):
    """A second process that takes ``lock`` and keeps it until killed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "-c", HOLD.format(root=root, lock=str(lock))],
                               stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_is_refused_with_the_holder_named_and_a_killed_one_is_taken_over(
        tmp_path):
    lock = tmp_path / "cache" / ".lock"
    process = holder(lock)
    try:
        with pytest.raises(usae_io.BusyError, match=f"process {process.pid} on "
                                                    f"{socket.gethostname()} has been holding"):
            with usae_io.exclusive(lock, "a second writer"):
                pass
        assert json.loads(lock.read_text())["pid"] == process.pid  # the holder keeps it
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert lock.exists()  # a SIGKILL leaves the lock behind ...
    with usae_io.exclusive(lock, "resuming"):  # ... and it does not block a resume
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_the_ranks_of_one_torchrun_job_share_the_lock(tmp_path):
    lock = tmp_path / ".lock"
    process = holder(lock, env={**os.environ, "TORCHELASTIC_RUN_ID": "job-7"})
    try:
        os.environ["TORCHELASTIC_RUN_ID"] = "job-7"
        with usae_io.exclusive(lock, "rank 1"):
            pass
        assert lock.exists()  # still the first holder's
        os.environ["TORCHELASTIC_RUN_ID"] = "job-8"
        with pytest.raises(usae_io.BusyError):
            with usae_io.exclusive(lock, "another job"):
                pass
    finally:
        os.environ.pop("TORCHELASTIC_RUN_ID", None)
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_the_lock_is_reentrant_and_released_on_error(tmp_path):
    lock = tmp_path / ".lock"
    with pytest.raises(KeyError):
        with usae_io.exclusive(lock, "outer"):
            with usae_io.exclusive(lock, "inner"):  # the same process: no deadlock
                pass
            assert lock.exists()  # the inner one does not release the outer one's lock
            raise KeyError("boom")
    assert not lock.exists()


def test_a_lock_of_a_process_that_no_longer_runs_is_taken_over(tmp_path):
    lock = tmp_path / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lock.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(),
                                "what": "building", "started": "earlier"}))
    with usae_io.exclusive(lock, "resuming"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


CONTEND = """
import sys, time
sys.path.insert(0, {root!r})
import usae_io
try:
    with usae_io.exclusive({lock!r}, "contending for a stale lock"):
        print("held", flush=True)
        time.sleep(1.5)
except usae_io.BusyError:
    print("busy", flush=True)
"""


def test_a_stale_lock_is_taken_over_by_exactly_one_of_several_processes(tmp_path):
    """Four processes started together contend for a lock left by a dead process: exactly one
    takes it over, the others are refused while it holds it."""
    lock = tmp_path / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                "what": "a run that was killed", "started": "earlier"}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = CONTEND.format(root=root, lock=str(lock))
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                  text=True) for _ in range(4)]
    outcomes = sorted(process.communicate(timeout=60)[0].strip() for process in processes)
    assert outcomes == ["busy", "busy", "busy", "held"]
    assert not lock.exists()
