"""Reliability (issue #7): the project loses nothing and never lies.

1. Interruption: extraction and training killed with SIGKILL at random moments resume to the
   very bytes / tensors of an uninterrupted run, losing at most one checkpoint interval.
2. Storage faults (no space, no permission, read-only disk): a clear error naming the path,
   never a half-written file under a final name, and the work resumes once the disk is fixed.
3. Corruption of cache arrays, cache metadata and checkpoints is detected and refused.
4. Bad images (fuzzed bytes, odd formats, misleading names) are loaded or skipped and listed.
5. Loading never executes code: planted malicious pickles are refused, never run.
6. Bad configuration is refused with a clear message before any long work starts.

Root runs the tests, and chmod does not stop root, so storage faults are simulated by making
the system calls fail (monkeypatch), as a full or read-only disk makes them fail.
"""
from __future__ import annotations

import ast
import errno
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import usae_cache as uc
import usae_checkpoint as ckpt
import usae_core as core
import usae_pipeline as pipeline
import usae_synthetic as synthetic
from conftest import FakeBackbone, coded_image

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"a": 12, "b": 16}


def fake_pair():
    return [FakeBackbone("alpha", 8, 1), FakeBackbone("beta", 12, 2)]


def build(images, out, **kwargs):
    kwargs = {"batch_size": 2, "tokens_per_image": 60, "progress": False, "workers": 1,
              **kwargs}
    return uc.build_cache(fake_pair(), images, out, **kwargs)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a folder, hidden ones included (a leftover temporary must show)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def write_images(folder: Path, n: int, broken: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coded_image(i + 1).save(folder / f"img_{i:03d}.png")
    if broken is not None:  # one bad file inside the run: it must be skipped the same way
        (folder / f"img_{broken:03d}.png").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"), 24, broken=5)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The cache of ``images`` built without interruption."""
    folder = tmp_path_factory.mktemp("reference") / "cache"
    build(images, folder)
    return folder


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    """A complete 6-image cache with positions.npy; tests corrupt copies of it."""
    root = tmp_path_factory.mktemp("small")
    folder = root / "cache"
    build(write_images(root / "images", 6), folder, batch_size=4)
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


# ----------------------------------------------------------------------------------------------
# 1. Interruption: SIGKILL at a random moment, then resume


def kill_when(command: list[str], ready, delay: float, timeout: float = 120) -> int:
    """Start ``command``; once ``ready()`` is true wait ``delay`` seconds, then SIGKILL it.

    Returns the exit status. Fails (and never hangs) if the process ends or stalls first.
    """
    with tempfile.TemporaryFile() as output:  # a file, not a pipe that could fill and block
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if process.poll() is not None:
                    output.seek(0)
                    pytest.fail(f"exited ({process.returncode}) before it could be killed:\n"
                                + output.read().decode()[-3000:])
                if time.monotonic() > deadline:
                    pytest.fail(f"no progress within {timeout} s")
                time.sleep(0.02)
            time.sleep(delay)
        finally:
            process.kill()
            process.wait(timeout=30)
    return process.returncode


def run_to_end(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


EXTRACT = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import FakeBackbone
import usae_cache as uc

images, out, log, mode = sys.argv[1:]

class Slow(FakeBackbone):
    def forward(self, pixels):
        time.sleep(0.2)
        tokens = super().forward(pixels)
        if self.name == "beta":  # the last model: this batch is computed
            with open(log, "a") as handle:
                handle.write(f"{{self.calls}}\\n")
        return tokens

if mode == "slow-finalize":  # stretch the final hashing so that a kill can land in it
    hashes = uc._block_hashes
    def slow_hashes(*args, **kwargs):
        open(log + ".finalizing", "w").close()
        time.sleep(1.0)
        return hashes(*args, **kwargs)
    uc._block_hashes = slow_hashes

uc.build_cache([Slow("alpha", 8, 1), Slow("beta", 12, 2)], images, out, batch_size=2,
               tokens_per_image=60, progress=False, workers=1)
"""


def test_killed_extraction_resumes_byte_identical(images, reference, tmp_path):
    """Two SIGKILLs during the batches and one during the final hashing lose at most the batch
    being computed, progress.json never claims more than was written, an unfinished cache is
    never opened, and the resumed cache is byte-identical to the uninterrupted one."""
    script = tmp_path / "extract.py"
    script.write_text(EXTRACT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    out, log = tmp_path / "cache", tmp_path / "log"
    progress = out / "progress.json"
    rng = np.random.default_rng(7)
    n, batch = 24, 2

    def command(mode="plain"):
        return [sys.executable, str(script), str(images), str(out), str(log), mode]

    for _ in range(2):
        before = json.loads(progress.read_text())["images_done"] if progress.exists() else 0
        log.unlink(missing_ok=True)
        status = kill_when(command(), lambda: progress.exists() and lines(log),
                           delay=rng.uniform(0, 1.0))
        assert status == -signal.SIGKILL
        done = json.loads(progress.read_text())["images_done"]
        computed = len(lines(log))  # batches whose forward pass finished in this run
        assert before + (computed - 1) * batch <= done <= min(n, before + computed * batch)
        assert done < n and not (out / "cache.json").exists()
        with pytest.raises(FileNotFoundError, match="unfinished"):
            uc.open_cache(out)

    finalizing = Path(str(log) + ".finalizing")
    status = kill_when(command("slow-finalize"), finalizing.exists, delay=rng.uniform(0, 0.5))
    assert status == -signal.SIGKILL and not (out / "cache.json").exists()
    assert json.loads(progress.read_text())["images_done"] == n

    run_to_end(command())
    assert folder_bytes(out) == folder_bytes(reference)
    uc.open_cache(out, verify="full")
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # whoever can read the arrays reads it all


TRAIN = """
import sys, time
sys.path.insert(0, {root!r})
import torch
import usae_checkpoint, usae_core, usae_synthetic

checkpoint, log, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.set_num_threads(1)
data = usae_synthetic.planted_concepts({dims!r}, 16, 2, 2048, seed=0)
batches = usae_synthetic.token_batches(data.acts, 128, seed=0)

class Stream:  # batch i of the run is batches[i % len]; logs each step as it starts
    def iter_from(self, step):
        while True:
            with open(log, "a") as handle:
                handle.write(f"{{step}}\\n")
            time.sleep(delay)
            yield batches[step % len(batches)]
            step += 1

usae_checkpoint.train(usae_core.USAE({dims!r}, 32, 2, seed=0), Stream(), {steps}, seed=3,
                      lr=1e-2, progress=False, checkpoint_path=checkpoint, checkpoint_every={every})
"""
STEPS, EVERY = 60, 7


def uninterrupted_training() -> dict[str, torch.Tensor]:
    data = synthetic.planted_concepts(DIMS, 16, 2, 2048, seed=0)
    batches = synthetic.token_batches(data.acts, 128, seed=0)
    model = core.USAE(DIMS, 32, 2, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess: the same float summation order
    try:
        core.train(model, batches, STEPS, seed=3, lr=1e-2, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model.state_dict()


def test_killed_training_resumes_to_the_uninterrupted_model(tmp_path):
    """SIGKILLs at random steps lose at most the steps since the last checkpoint, the file at
    the checkpoint path is always a complete checkpoint, and the resumed run ends with every
    tensor equal to an uninterrupted run with the same seed."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN.format(root=str(ROOT), dims=DIMS, steps=STEPS, every=EVERY))
    checkpoint, log = tmp_path / "usae.safetensors", tmp_path / "log"
    rng = np.random.default_rng(11)

    def command(delay):
        return [sys.executable, str(script), str(checkpoint), str(log), str(delay)]

    for _ in range(2):
        log.unlink(missing_ok=True)
        status = kill_when(command(0.1), lambda: len(lines(log)) > 1,
                           delay=rng.uniform(0, 1.2))
        assert status == -signal.SIGKILL
        started = int(lines(log)[-1])  # steps done when the last logged one began
        saved = ckpt.read_header(checkpoint)["training"]["step"] if checkpoint.exists() else 0
        assert started // EVERY * EVERY <= saved <= started + 1 < STEPS
        if saved:
            ckpt.load(checkpoint)  # complete and readable, never half-written

    run_to_end(command(0.0))
    assert ckpt.read_header(checkpoint)["training"]["step"] == STEPS
    resumed, expected = ckpt.load(checkpoint).state_dict(), uninterrupted_training()
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_a_killed_checkpoint_write_leaves_no_temporary_behind_after_resuming(tmp_path):
    checkpoint = tmp_path / "usae.safetensors"
    stale = tmp_path / ".usae.safetensors.k1ll3d.tmp"  # atomic_write's naming
    stale.write_bytes(b"half a checkpoint")
    batches = synthetic.token_batches(synthetic.planted_concepts(DIMS, 8, 2, 256).acts, 64)
    ckpt.train(core.USAE(DIMS, 16, 2, seed=0), batches, 2, progress=False,
               checkpoint_path=str(checkpoint))
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------
# 2. Storage faults


def fail_on(monkeypatch, module, name, code, when=lambda *args, **kwargs: True, after=0):
    """Make ``module.name`` raise OSError(code) when ``when(...)``, after ``after`` good calls."""
    original, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        if when(*args, **kwargs):
            calls.append(args)
            if len(calls) > after:
                raise OSError(code, os.strerror(code))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def assert_clean_failure(error: pytest.ExceptionInfo, path: Path, folder: Path, code: int):
    """A clear error naming the file, and nothing half-written under a final name."""
    assert error.value.errno == code
    assert str(path) in str(error.value) and "writable folder with free space" in str(error.value)
    left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert not [name for name in left if name.endswith(".tmp")], left
    assert "cache.json" not in left


def named(target):
    return lambda source, destination, *args, **kwargs: Path(destination).name == target


@pytest.mark.parametrize("case", ["memmap", "progress", "kept", "mkdir", "mkstemp"])
def test_storage_faults_of_a_cache_build_are_clear_and_leave_no_partial_file(
        case, images, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    code, path = {
        "memmap": (errno.ENOSPC, out / "beta.npy.partial"),
        "progress": (errno.EROFS, out / "progress.json"),
        "kept": (errno.EACCES, out / "kept_images.npy"),
        "mkdir": (errno.EROFS, out),
        "mkstemp": (errno.EACCES, out / "progress.json")}[case]
    if case == "memmap":
        fail_on(monkeypatch, np.lib.format, "open_memmap", code, after=1)
    elif case in ("progress", "kept"):
        fail_on(monkeypatch, os, "replace", code, named(path.name))
    elif case == "mkdir":
        fail_on(monkeypatch, Path, "mkdir", code)
    else:
        fail_on(monkeypatch, tempfile, "mkstemp", code)
    with pytest.raises(OSError) as error:
        build(images, out)
    assert_clean_failure(error, path, out, code)
    if case in ("memmap", "progress", "mkdir", "mkstemp"):  # nothing was done: nothing is left
        assert not out.exists() or not list(out.iterdir())


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate")
def test_a_disk_that_fills_up_mid_build_stops_cleanly_and_the_build_resumes(
        images, reference, tmp_path, monkeypatch):
    """Disk blocks are reserved before each batch is written through the memory map (where a
    full disk would kill the process with SIGBUS): ENOSPC becomes a clear error, the batches
    done are kept, and after space is freed the build ends byte-identical."""
    out = tmp_path / "cache"
    fail_on(monkeypatch, os, "posix_fallocate", errno.ENOSPC, after=6)  # batch 4, model alpha
    with pytest.raises(OSError) as error:
        build(images, out)
    assert_clean_failure(error, out / "alpha.npy.partial", out, errno.ENOSPC)
    assert json.loads((out / "progress.json").read_text())["images_done"] == 6
    assert not (out / "alpha.npy").exists()  # arrays keep their final name until complete
    monkeypatch.undo()
    build(images, out)
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_failure_writing_cache_json_keeps_the_cache_unfinished_and_resumable(
        images, reference, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    fail_on(monkeypatch, os, "replace", errno.ENOSPC, named("cache.json"))
    with pytest.raises(OSError) as error:
        build(images, out)
    assert_clean_failure(error, out / "cache.json", out, errno.ENOSPC)
    with pytest.raises(FileNotFoundError, match="unfinished"):
        uc.open_cache(out)
    monkeypatch.undo()
    build(images, out)
    assert folder_bytes(out) == folder_bytes(reference)


@pytest.mark.parametrize("module, name, code", [(os, "replace", errno.EROFS),
                                                (tempfile, "mkstemp", errno.EACCES),
                                                (ckpt, "save_file", errno.ENOSPC)])
def test_a_failed_checkpoint_write_keeps_the_last_one_and_training_resumes(
        module, name, code, tmp_path, monkeypatch):
    checkpoint = tmp_path / "usae.safetensors"
    batches = synthetic.token_batches(synthetic.planted_concepts(DIMS, 8, 2, 1024).acts, 64)

    def run():
        return ckpt.train(core.USAE(DIMS, 16, 2, seed=0), batches, 12, seed=1, progress=False,
                          checkpoint_path=str(checkpoint), checkpoint_every=4)

    fail_on(monkeypatch, module, name, code, after=1)  # the second checkpoint, at step 8
    with pytest.raises(OSError) as error:
        run()
    assert error.value.errno == code and str(checkpoint) in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["usae.safetensors"]
    assert ckpt.read_header(checkpoint)["training"]["step"] == 4
    monkeypatch.undo()
    resumed = run().model.state_dict()
    checkpoint.unlink()
    expected = run().model.state_dict()
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)


# ----------------------------------------------------------------------------------------------
# 3. Corruption


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, count: int = 10) -> None:
    path.write_bytes(path.read_bytes()[:-count])


def npy_header(path: Path) -> int:
    with open(path, "rb") as handle:
        np.lib.format.read_magic(handle)
        np.lib.format.read_array_header_1_0(handle)
        return handle.tell()


CORRUPTIONS = {  # name -> (damage, what the refusal says); content damage needs hashing
    "truncated array": (lambda c: truncate(c / "alpha.npy"), "truncated"),
    "array byte": (lambda c: flip(c / "beta.npy", 3000), "differ from the checksum"),
    "array header": (lambda c: (c / "alpha.npy").write_bytes(
        (c / "alpha.npy").read_bytes().replace(b"(360, 8)", b"(300, 8)")), "holds float16"),
    "kept byte": (lambda c: flip(c / "kept_images.npy", npy_header(c / "kept_images.npy")),
                  "differ from the checksum"),
    "truncated positions": (lambda c: truncate(c / "positions.npy"), "truncated"),
    "deleted array": (lambda c: (c / "beta.npy").unlink(), "missing"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_damaged_cache_files_are_refused_in_every_mode_that_can_see_it(kind, small_cache,
                                                                       tmp_path):
    folder = copy_of(small_cache, tmp_path)
    change, message = CORRUPTIONS[kind]
    change(folder)
    content_only = message == "differ from the checksum"
    for verify in ("auto", "full", "size"):
        if content_only and verify == "size":
            uc.open_cache(folder, verify="size")  # documented: sizes and shapes only
            continue
        with pytest.raises(uc.CorruptCacheError, match=message) as error:
            uc.open_cache(folder, verify=verify)
        assert "rebuild=True" in str(error.value)


def edit_metadata(folder: Path, change, *, keep_checksum: bool = False) -> None:
    path = folder / "cache.json"
    metadata = json.loads(path.read_text())
    change(metadata)
    if keep_checksum:  # a careful forger: the metadata's own checksum made consistent again
        metadata["checksums"]["metadata_sha256"] = uc._metadata_digest(metadata)
    path.write_text(json.dumps(metadata))


METADATA_DAMAGE = {
    "invalid JSON": (lambda c: truncate(c / "cache.json", 200), "not valid JSON"),
    "not an object": (lambda c: (c / "cache.json").write_text("[1, 2]"), "not an object"),
    "missing key": (lambda c: edit_metadata(c, lambda m: m.pop("n_tokens"), keep_checksum=True),
                    "no valid 'n_tokens'"),
    "model without std": (lambda c: edit_metadata(
        c, lambda m: m["models"][1].pop("std"), keep_checksum=True), "'std' for model 'beta'"),
    "edited value": (lambda c: edit_metadata(
        c, lambda m: m["models"][0].update(std=m["models"][0]["std"] * 1.01)), "was edited"),
    "forged rows": (lambda c: edit_metadata(
        c, lambda m: m.update(n_tokens=300), keep_checksum=True), "metadata says float16"),
    "forged kept": (lambda c: edit_metadata(
        c, lambda m: m.update(n_images_kept=5), keep_checksum=True), "image indices"),
    "path escape": (lambda c: edit_metadata(
        c, lambda m: m["files"].update(kept_images="../../etc/passwd"), keep_checksum=True),
        "bad file name"),
    "forged checksums": (lambda c: edit_metadata(
        c, lambda m: m["checksums"]["files"]["beta.npy"]["blocks"].pop(), keep_checksum=True),
        "malformed checksums"),
}


@pytest.mark.parametrize("kind", METADATA_DAMAGE)
def test_damaged_or_edited_cache_json_is_refused(kind, small_cache, tmp_path):
    folder = copy_of(small_cache, tmp_path)
    change, message = METADATA_DAMAGE[kind]
    change(folder)
    with pytest.raises(uc.CorruptCacheError, match=message) as error:
        uc.open_cache(folder, verify="size")
    assert str(folder) in str(error.value) and "rebuild" in str(error.value)


def test_build_cache_on_damaged_metadata_says_rebuild_and_rebuild_repairs(small_cache,
                                                                         tmp_path):
    folder = copy_of(small_cache, tmp_path)
    metadata = json.loads((folder / "cache.json").read_text())
    images = Path(metadata["images"]["root"])
    truncate(folder / "cache.json", 200)
    with pytest.raises(uc.CorruptCacheError, match="rebuild=True"):
        build(images, folder, batch_size=4)
    build(images, folder, batch_size=4, rebuild=True)
    assert folder_bytes(folder) == folder_bytes(small_cache)


def test_caches_without_content_checksums_open_on_sizes_and_shapes(small_cache, tmp_path):
    """Caches built before checksums existed, and synthetic ones, still open (sizes and shapes
    checked) but cannot be fully verified, and say so."""
    folder = copy_of(small_cache, tmp_path)
    edit_metadata(folder, lambda m: m.pop("checksums"))
    uc.open_cache(folder)
    with pytest.raises(ValueError, match="no checksums"):
        uc.open_cache(folder, verify="full")
    truncate(folder / "beta.npy")
    with pytest.raises(uc.CorruptCacheError, match="beta.npy is not a readable numpy array"):
        uc.open_cache(folder)

    synthetic_cache = tmp_path / "synthetic"
    uc.make_synthetic_cache(synthetic_cache, {"a": 4, "b": 6}, 3, stats_sample=2)
    flip(synthetic_cache / "a.npy", 500)
    uc.open_cache(synthetic_cache)  # content unchecked by design (tests edit these in place)
    with pytest.raises(ValueError, match="verify='size'"):
        uc.open_cache(synthetic_cache, verify="full")
    truncate(synthetic_cache / "b.npy")
    with pytest.raises(uc.CorruptCacheError, match="truncated"):
        uc.open_cache(synthetic_cache)


def test_auto_verification_samples_blocks_of_a_large_cache(tmp_path, monkeypatch):
    """Above AUTO_FULL_BYTES ``auto`` hashes the first, the last and a seeded draw of the other
    blocks of each file (never more than SAMPLE_BLOCKS), so a 1 TB cache opens in seconds:
    truncation and damaged ends are always caught, a damaged middle block sometimes."""
    monkeypatch.setattr(uc, "CHECKSUM_BLOCK", 512)
    build(write_images(tmp_path / "images", 6), tmp_path / "cache", batch_size=4)
    monkeypatch.setattr(uc, "AUTO_FULL_BYTES", 0)
    monkeypatch.setattr(uc, "SAMPLE_BLOCKS", 6)
    beta = tmp_path / "cache" / "beta.npy"
    blocks = -(-beta.stat().st_size // 512)
    assert blocks == 18
    hashed = []
    original = uc._block_hashes
    monkeypatch.setattr(uc, "_block_hashes", lambda path, block, indices=None: (
        hashed.append((path.name, list(indices))) or original(path, block, indices)))
    uc.open_cache(tmp_path / "cache", seed=0)
    assert all(len(chosen) <= 6 for _, chosen in hashed)
    assert dict(hashed)["beta.npy"][0] == 0 and dict(hashed)["beta.npy"][-1] == blocks - 1

    for offset in (200, beta.stat().st_size - 1):  # first and last block: always hashed
        flip(beta, offset)
        for seed in range(5):
            with pytest.raises(uc.CorruptCacheError, match="beta.npy: bytes"):
                uc.open_cache(tmp_path / "cache", seed=seed)
        flip(beta, offset)

    flip(beta, 9 * 512 + 7)  # a middle block
    caught = 0
    for seed in range(40):
        try:
            uc.open_cache(tmp_path / "cache", seed=seed)
        except uc.CorruptCacheError:
            caught += 1
    assert 0 < caught < 40  # sampled: 4 of the 16 middle blocks per open
    with pytest.raises(uc.CorruptCacheError, match=r"bytes 4,608\.\.5,120"):
        uc.open_cache(tmp_path / "cache", verify="full")


def tiny_checkpoint(path: Path) -> None:
    batches = synthetic.token_batches(synthetic.planted_concepts(DIMS, 8, 2, 256).acts, 64)
    ckpt.train(core.USAE(DIMS, 16, 3, seed=0), batches, 8, progress=False,
               checkpoint_path=str(path))


def test_a_truncated_checkpoint_is_refused_when_training_resumes(tmp_path):
    path = tmp_path / "usae.safetensors"
    tiny_checkpoint(path)
    truncate(path, 64)
    batches = synthetic.token_batches(synthetic.planted_concepts(DIMS, 8, 2, 256).acts, 64)
    with pytest.raises(ckpt.CheckpointError, match="restore it from a copy"):
        ckpt.train(core.USAE(DIMS, 16, 3, seed=0), batches, 12, progress=False,
                   checkpoint_path=str(path))


@pytest.mark.parametrize("where", ["tensor byte", "header value"])
def test_an_altered_checkpoint_is_refused(where, tmp_path):
    path = tmp_path / "usae.safetensors"
    tiny_checkpoint(path)
    if where == "tensor byte":
        flip(path, path.stat().st_size - 3)  # inside the last tensor's data
    else:  # same length, still valid JSON, loads into a model of another k
        path.write_bytes(path.read_bytes().replace(b'\\"k\\": 3', b'\\"k\\": 4', 1))
        assert ckpt.read_header(path)["model"]["k"] == 4
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(path)


# ----------------------------------------------------------------------------------------------
# 4. Bad images


def png(width: int, height: int, depth: int, color: int, raw: bytes) -> bytes:
    """A PNG written by hand: for 16-bit colour, and for headers that lie about the size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def png16(pixels: np.ndarray) -> bytes:
    height, width, channels = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    return png(width, height, 16, {3: 2, 4: 6}[channels], raw)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
SEEDS = {fmt: encoded(PHOTO, fmt) for fmt in ("JPEG", "PNG", "BMP", "WEBP", "TIFF")}


def check_opened(path: Path) -> uc.OpenedImage:
    opened = uc.open_image(path)
    if opened.image is None:
        assert isinstance(opened.reason, str) and opened.reason
    else:
        assert opened.reason is None and opened.image.mode == "RGB"
        assert min(opened.image.size) >= 1
    return opened


FUZZ = settings(max_examples=50, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=3000), name=st.sampled_from(["x.jpg", "x.png", "x.tif"]))
def test_open_image_never_raises_on_random_bytes(data, name, tmp_path):
    path = tmp_path / name
    path.write_bytes(data)
    check_opened(path)


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # PIL's, on cut TIFF headers
@FUZZ
@given(fmt=st.sampled_from(sorted(SEEDS)), cut=st.floats(0.05, 1.0),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                      max_size=12))
def test_open_image_never_raises_on_mutated_images(fmt, cut, flips, tmp_path):
    data = bytearray(SEEDS[fmt][:max(1, int(len(SEEDS[fmt]) * cut))])
    for where, value in flips:
        data[int(where * len(data))] ^= value
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(bytes(data))
    check_opened(path)


def odd_files(folder: Path) -> dict[str, str | None]:
    """Cases tests/test_cache.py does not cover -> None if loaded, else part of the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    grey16 = np.zeros((4, 5, 3), np.uint16)
    grey16[..., 0], grey16[..., 1] = 257 * 100, 65535
    alpha16 = np.zeros((4, 5, 4), np.uint16)  # transparent red: white on the page
    alpha16[..., 0] = 65535
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": stored 40x20, shown 20x40
    files = {
        "rgb16.png": (png16(grey16), None),
        "rgba16.png": (png16(alpha16), None),
        "png_named.jpg": (SEEDS["PNG"], None),
        "text_named.png": (b"just some notes, not pixels\n" * 10, "cannot decode"),
        "truncated.png": (SEEDS["PNG"][: len(SEEDS["PNG"]) // 2], "cannot decode"),
        "cmyk.tif": (encoded(Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "TIFF"), None),
        "rotated.jpg": (encoded(Image.new("RGB", (40, 20)), "JPEG", exif=exif), None),
        "frames.tif": (encoded(Image.new("RGB", (6, 4), (0, 0, 255)), "TIFF", save_all=True,
                               append_images=[Image.new("RGB", (6, 4), (255, 0, 0))]), None),
        "claims_huge.png": (png(100_000, 100_000, 8, 2, b"\0" * 10), "decompression bomb"),
        "claims_big.png": (png(7000, 7000, 8, 2, b"\0" * 10), "too large"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "folder.jpg").mkdir()  # a folder with an image's name: not listed
    return {name: reason for name, (_, reason) in files.items()} | {
        "dangling.jpg": "cannot decode"}


def test_odd_images_are_loaded_or_refused_with_a_reason(tmp_path):
    expected = odd_files(tmp_path)
    for name, reason in expected.items():
        opened = check_opened(tmp_path / name)
        if reason is None:
            assert opened.image is not None, (name, opened.reason)
        else:
            assert opened.image is None and reason in opened.reason, (name, opened.reason)
    pixel = {name: uc.open_image(tmp_path / name).image.getpixel((0, 0))
             for name in ("rgb16.png", "rgba16.png", "cmyk.tif", "frames.tif")}
    assert pixel == {"rgb16.png": (100, 255, 0), "rgba16.png": (255, 255, 255),
                     "cmyk.tif": (255, 0, 0), "frames.tif": (0, 0, 255)}
    assert uc.open_image(tmp_path / "rotated.jpg").image.size == (20, 40)


def test_a_build_over_fuzzed_and_odd_files_completes_and_lists_every_skip(tmp_path):
    folder = tmp_path / "images"
    expected = odd_files(folder)
    rng = np.random.default_rng(5)
    for i in range(20):
        (folder / f"random_{i:02d}.jpg").write_bytes(rng.bytes(int(rng.integers(0, 2000))))
    for i in range(15):
        data = bytearray(SEEDS[["JPEG", "PNG", "WEBP"][i % 3]])
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
        (folder / f"mutated_{i:02d}.{['jpg', 'png', 'webp'][i % 3]}").write_bytes(
            bytes(data[: int(rng.integers(len(data) // 2, len(data) + 1))]))
    for i in range(3):
        coded_image(i + 1).save(folder / f"good_{i}.png")

    cache = build(folder, tmp_path / "cache", batch_size=8, tokens_per_image=4)
    listed = uc.list_images(folder)
    assert "folder.jpg" not in listed.paths
    skipped = {item["path"]: item["reason"] for item in cache.metadata["skipped"]["images"]}
    kept = {listed.paths[i] for i in cache.kept_images}
    assert kept.isdisjoint(skipped) and kept | set(skipped) == set(listed.paths)
    assert all(reason for reason in skipped.values())
    assert {f"good_{i}.png" for i in range(3)} <= kept
    for name, reason in expected.items():
        assert (name in skipped) == (reason is not None), name
    assert cache.n_tokens == 4 * len(kept)
    uc.open_cache(tmp_path / "cache", verify="full")


# ----------------------------------------------------------------------------------------------
# 5. Safe loading


class Payload:
    """Unpickling this touches a marker file: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def payload(tmp_path):
    """(marker, malicious pickle bytes); the payload is shown to be live before use."""
    marker = tmp_path / "PWNED"
    data = pickle.dumps(Payload(marker), protocol=4)
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()
    return marker, data


def plant(path: Path, data: bytes, same_size: bool) -> None:
    """Replace a file with the pickle, padded to the file's size (pickle ignores the rest),
    so that the size check does not stop it first and the loader itself must refuse it."""
    size = path.stat().st_size
    path.write_bytes(data + b"\0" * (size - len(data)) if same_size else data)


@pytest.mark.parametrize("name", ["alpha.npy", "kept_images.npy", "positions.npy",
                                  "cache.json"])
@pytest.mark.parametrize("same_size", [False, True])
def test_a_pickle_planted_in_a_cache_is_refused_and_never_run(name, same_size, payload,
                                                              small_cache, tmp_path):
    marker, data = payload
    folder = copy_of(small_cache, tmp_path)
    plant(folder / name, data, same_size)
    if name.endswith(".npy") and same_size:  # numpy itself would run it, if asked to
        np.load(folder / name, allow_pickle=True)
        assert marker.exists()
        marker.unlink()
    for verify in ("auto", "size"):
        with pytest.raises(uc.CorruptCacheError):
            uc.open_cache(folder, verify=verify)
    if name == "cache.json":
        images = Path(json.loads((small_cache / "cache.json").read_text())["images"]["root"])
        with pytest.raises(uc.CorruptCacheError):
            build(images, folder, batch_size=4)
    assert not marker.exists()


def test_a_pickle_planted_in_an_unfinished_cache_or_a_checkpoint_is_refused(payload, images,
                                                                            tmp_path):
    marker, data = payload
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "progress.json").write_bytes(data)
    with pytest.raises(uc.CorruptCacheError):
        uc.open_cache(unfinished)
    with pytest.raises(uc.CorruptCacheError):
        build(images, unfinished)

    checkpoint = tmp_path / "usae.safetensors"
    checkpoint.write_bytes(data)
    for load in (ckpt.load, ckpt.read_header):
        with pytest.raises(ckpt.CheckpointError):
            load(checkpoint)
    batches = synthetic.token_batches(synthetic.planted_concepts(DIMS, 8, 2, 256).acts, 64)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.train(core.USAE(DIMS, 16, 2), batches, 2, progress=False,
                   checkpoint_path=str(checkpoint))
    assert not marker.exists()


def project_sources() -> list[Path]:
    return sorted([*ROOT.glob("*.py"), *ROOT.glob("notebooks/*.py"),
                   *ROOT.glob("benchmarks/*.py")])


def test_no_loader_in_the_project_can_unpickle():
    """Every np.load keeps allow_pickle=False, every torch.load has weights_only=True, and
    nothing calls pickle, marshal, dill, joblib or an unsafe yaml.load (tests/ plants
    pickles on purpose and is not scanned)."""
    problems, loads = [], 0
    for path in project_sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            call = f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}"
            if node.func.attr == "load" and owner in ("np", "numpy"):
                loads += 1
                if keywords.get("allow_pickle", "False") != "False":
                    problems.append(call)
            elif node.func.attr == "load" and owner == "torch":
                loads += 1
                if keywords.get("weights_only") != "True":
                    problems.append(call)
            elif owner in ("pickle", "cPickle", "marshal", "dill", "joblib", "cloudpickle") \
                    and node.func.attr.startswith("load"):
                problems.append(call)
            elif owner == "yaml" and node.func.attr in ("load", "unsafe_load", "full_load"):
                problems.append(call)
    assert loads >= 3 and not problems, problems
    assert "yaml.safe_load" in (ROOT / "run_all.sh").read_text()
    assert "yaml.load(" not in (ROOT / "run_all.sh").read_text()


# ----------------------------------------------------------------------------------------------
# 6. Bad configuration, refused before any long work


@pytest.fixture(scope="module")
def odd_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paths")
    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "no_train").mkdir()
    coded_image(1).save(root / "no_train" / "x.png")
    return {"file": root / "a_file", "empty": root / "empty", "missing": root / "missing",
            "no_train": root / "no_train"}


RUN_ALL_CASES = [  # arguments, what the message must say
    (["--bogus"], "unknown option '--bogus'"),
    (["stray"], "unknown option 'stray'"),
    (["--seed=3"], "unknown option '--seed=3'"),
    (["--seed"], "--seed needs a value"),
    (["--out"], "--out needs a value"),
    (["--images", "--quick"], "--images needs a value"),
    (["--preset", ""], "--preset needs a value"),
    (["--seed", "-1"], "--seed must be an integer"),
    (["--seed", "1.5"], "--seed must be an integer"),
    (["--seed", "ten"], "--seed must be an integer"),
    (["--seed", "99999999999999999999"], "--seed must be an integer"),
    (["--preset", "imagenet"], "unknown preset 'imagenet'"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--device", "cuda:x"], "--device must be cpu or cuda"),
    (["--images", "{missing}"], "does not exist"),
    (["--images", "{file}"], "is not a folder"),
    (["--out", "{file}"], "exists and is not a folder"),
    (["--preset", "paper"], "needs --images"),
    (["--preset", "paper", "--images", "{no_train}"], "has no train/ folder"),
]


@pytest.mark.parametrize("args, message", RUN_ALL_CASES, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_run_all_refuses_bad_options_within_seconds(args, message, odd_paths, tmp_path):
    out = tmp_path / "out"
    args = [a.format(**{k: str(v) for k, v in odd_paths.items()}) for a in args]
    # --out first, so that a refused option can never send work to the real results/ folder
    command = ["bash", str(ROOT / "run_all.sh"), "--out", str(out), *args]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stderr
    assert not out.exists()  # refused before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_run_all_refuses_cuda_without_a_gpu(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--out", str(tmp_path / "o"),
                             "--device", "cuda"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no CUDA GPU is visible" in result.stderr


EXPERIMENT_CASES = [
    ({"n_concepts": -5}, "n_concepts must be a positive integer"),
    ({"k": -1}, "k must be a positive integer"),
    ({"n_concepts": 64, "k": 64}, "k=64 must be smaller than n_concepts=64"),
    ({"batch_tokens": 2.5}, "batch_tokens must be a positive integer"),
    ({"seed": "1"}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": 2**64}, "seed must be below 2\\*\\*63"),
    ({"preset": "imagenet"}, "unknown preset 'imagenet'"),
    ({"backbones": ["dinov2_imgfocus", "resnet_from_nowhere"]}, "unknown backbone"),
    ({"backbones": "dinov2_imgfocus"}, "backbones must be a list"),
    ({"backbones": ["dinov2_imgfocus"]}, "at least two distinct models"),
    ({"device": "tpu"}, "device must be 'cpu' or 'cuda"),
    ({"epochs": float("nan")}, "epochs must be a positive number"),
    ({"epochs": True}, "epochs must be a positive number"),
    ({"lr": -1e-3}, "lr must be a positive number"),
    ({"train_images": -3}, "train_images must be an integer >= 0"),
    ({"tokens_per_image": 500}, "exceeds the 196 grid positions"),
    ({"quick": "yes"}, "quick must be True or False"),
    ({"images": "{missing}"}, "does not exist"),
    ({"images": "{file}"}, "is not a folder"),
    ({"images": "{empty}"}, "no image found"),
    ({"images": 5}, "images must be a folder path"),
    ({"out": "{file}"}, "exists and is not a folder"),
    ({"preset": "paper"}, "needs --images"),
]


@pytest.mark.parametrize("options, message", EXPERIMENT_CASES,
                         ids=[str(o) for o, _ in EXPERIMENT_CASES])
def test_experiment_refuses_nonsense(options, message, odd_paths):
    options = {k: v.format(**odd_paths) if isinstance(v, str) else v for k, v in options.items()}
    options.setdefault("out", str(odd_paths["missing"] / "out"))
    with pytest.raises(ValueError, match=message):
        pipeline.Experiment(**options)


BUILD_CASES = [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer"),
    ({"tokens_per_image": 0}, "tokens_per_image must be within 1..196"),
    ({"tokens_per_image": 197}, "tokens_per_image must be within 1..196"),
    ({"stats_sample": -1}, "stats_sample must be a positive integer"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"seed": "0"}, "seed must be an integer >= 0"),
    ({"workers": 0}, "workers must be a positive integer"),
    ({"device": "tpu"}, "'tpu' is not a torch device"),
    ({"images": "{missing}"}, "does not exist"),
    ({"images": "{empty}"}, "no image found"),
    ({"out": "{file}"}, "exists and is not a folder"),
    ({"backbones": []}, "at least one backbone"),
]


@pytest.mark.parametrize("options, message", BUILD_CASES, ids=[str(o) for o, _ in BUILD_CASES])
def test_build_cache_refuses_nonsense_before_writing_anything(options, message, odd_paths,
                                                              images, tmp_path):
    options = {k: v.format(**odd_paths) if isinstance(v, str) else v for k, v in options.items()}
    source = options.pop("images", images)
    out = Path(options.pop("out", tmp_path / "cache"))
    backbones = options.pop("backbones", fake_pair())
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        uc.build_cache(backbones, source, out, progress=False, **options)
    assert out == odd_paths["file"] or not out.exists()


@pytest.mark.parametrize("options, message", [
    ({"chunk_rows": 0}, "chunk_rows must be an integer >= 1"),
    ({"buffer_chunks": -2}, "buffer_chunks must be an integer >= 1"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"seed": 0.5}, "seed must be an integer >= 0"),
    ({"device": "tpu"}, "'tpu' is not a torch device")])
def test_token_loader_refuses_nonsense(options, message, small_cache):
    with pytest.raises(ValueError, match=message):
        uc.TokenLoader(small_cache, batch_size=8, **options)


def test_token_loader_and_open_cache_refuse_a_missing_cache_and_an_unknown_mode(tmp_path,
                                                                               small_cache):
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        uc.TokenLoader(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="verify='quick' is not one of"):
        uc.open_cache(small_cache, verify="quick")


def tiny_batches():
    return synthetic.token_batches(synthetic.planted_concepts(DIMS, 8, 2, 128).acts, 32)


@pytest.mark.parametrize("options, message", [
    ({"dims": {"a": True}}, "width of model 'a'"),
    ({"dims": [("a", 4)]}, "non-empty mapping"),
    ({"n_concepts": 16.0}, "n_concepts must be a positive integer"),
    ({"k": -2}, "k must be a positive integer"),
    ({"seed": "0"}, "seed"),
    ({"seed": 1.5}, "seed")])
def test_usae_refuses_nonsense(options, message):
    arguments = {"dims": DIMS, "n_concepts": 16, "k": 2, **options}
    with pytest.raises(ValueError, match=message):
        core.USAE(arguments.pop("dims"), arguments.pop("n_concepts"), arguments.pop("k"),
                  **arguments)


@pytest.mark.parametrize("options, message", [
    ({"steps": -1}, "steps must be a positive integer"),
    ({"steps": 2.5}, "steps must be a positive integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"checkpoint_every": -1}, "checkpoint_every must be an integer >= 0"),
    ({"checkpoint_every": 2.5}, "checkpoint_every must be an integer >= 0"),
    ({"grad_clip": -1.0}, "grad_clip must be a finite number >= 0"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"final_lr": -1e-6}, "final_lr must be a finite number >= 0"),
    ({"aux_weight": float("nan")}, "aux_weight must be a finite number"),
    ({"precision": "fp16"}, "precision='fp16' is not one of"),
    ({"log_every": True}, "log_every must be a positive integer"),
    ({"device": "tpu"}, "device"),
    ({"warmup_steps": True}, "warmup_steps"),
    ({"resume": "yes"}, "resume"),
    ({"checkpoint_path": 123}, "checkpoint_path")])
def test_train_refuses_nonsense_before_any_step(options, message, tmp_path):
    options = {"steps": 2, "seed": 0, "progress": False, **options}
    model = core.USAE(DIMS, 16, 2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        ckpt.train(model, tiny_batches(), options.pop("steps"), options.pop("seed"), **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
