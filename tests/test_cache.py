"""Tests of usae_cache: building a cache (alignment, sizes, statistics, resuming after a crash
or a storage fault, refusing another request or bad arguments) and opening it."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import usae_cache as uc
import usae_cache_files
import usae_cache_verify
import usae_images
import usae_io
import usae_loader
from conftest import (BAD, ROOT, build_pair, coded_image, copy_of, fail_on, fake_pair,
                      folder_bytes, kill_when, lines, run_to_end, truncate)
from test_images import SEEDS, odd_files
from test_io import holder
from usae_cache_files import CacheMismatchError
from usae_cache_verify import CorruptCacheError

# ----------------------------------------------------------------------------------------------
# Helpers


def build(backbones, images, out, **kwargs):
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 2)
    return uc.build_cache(backbones, images, out, **kwargs)


def pair(make, seed_a=1, seed_b=2):
    return [make("alpha", 8, seed_a), make("beta", 12, seed_b)]


def read_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The cache of ``images`` built without interruption."""
    folder = tmp_path_factory.mktemp("reference") / "cache"
    build_pair(images, folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Building a cache


def test_build_skips_bad_images_and_completes(odd_folder, tmp_path, make_fake_backbone):
    images = usae_images.list_images(odd_folder)
    cache = build(pair(make_fake_backbone), images, tmp_path / "c")
    skipped = cache.metadata["skipped"]
    assert skipped["count"] == len(BAD)
    assert {item["path"] for item in skipped["images"]} == BAD
    assert all(item["reason"] for item in skipped["images"])
    kept_names = {images.paths[i] for i in cache.kept_images}
    assert kept_names == set(images.paths) - BAD
    assert cache.n_tokens == len(kept_names) * 196
    for array in cache.arrays.values():
        assert np.isfinite(array).all()


def test_rows_are_aligned_across_models(tmp_path, make_fake_backbone, write_coded_images):
    images = usae_images.list_images(write_coded_images(tmp_path / "imgs", 7))
    for tokens in (None, 50):
        cache = build(pair(make_fake_backbone), images, tmp_path / f"c{tokens}",
                      tokens_per_image=tokens)
        a, b = (np.asarray(cache.arrays[n], dtype=np.float64) for n in ("alpha", "beta"))
        identity = np.array([1 + int(Path(p).stem[4:]) for p in images.paths])
        # channel 0 = grid position, channel 1 = image identity, in both models' rows
        assert (a[:, 0] == cache.position_of_row()).all()
        assert (b[:, 0] == cache.position_of_row()).all()
        assert (a[:, 1] == identity[cache.image_of_row()]).all()
        assert (b[:, 1] == identity[cache.image_of_row()]).all()
        assert not np.allclose(a[:, 3:8], b[:, 3:8])  # the models do differ elsewhere
        assert cache.n_tokens == 7 * (tokens or 196)


def test_token_subsample(tmp_path, make_fake_backbone, write_coded_images):
    images = usae_images.list_images(write_coded_images(tmp_path / "imgs", 6))
    widths = [8, 12]
    tokens = uc.tokens_per_image_for_budget(widths, len(images), budget_bytes=6 * 40 * 20 * 2)
    assert tokens == 40
    cache = build(pair(make_fake_backbone), images, tmp_path / "a", tokens_per_image=tokens)
    positions = cache.positions
    assert positions.shape == (6, 40)
    assert all(len(set(row)) == 40 and (np.diff(row) > 0).all() for row in positions)
    assert len({tuple(row) for row in positions}) == 6  # drawn per image
    assert cache.metadata["bytes_per_image"] == uc.cache_bytes_per_image(widths, 40) == 1600
    on_disk = sum(array.nbytes for array in cache.arrays.values())
    assert on_disk == 6 * 1600 <= 6 * 40 * 20 * 2
    same = build(pair(make_fake_backbone), images, tmp_path / "b", tokens_per_image=tokens)
    other = build(pair(make_fake_backbone), images, tmp_path / "c", tokens_per_image=tokens,
                  seed=1)
    assert (same.positions == positions).all()
    assert not (other.positions == positions).all()


def test_size_helpers():
    assert uc.cache_bytes_per_image([384, 768, 768], 196) == 752_640
    assert uc.tokens_per_image_for_budget([384, 768, 768], 100_000, 25e9) == 65
    assert uc.tokens_per_image_for_budget([384, 768, 768], 10, 1e12) == 196
    with pytest.raises(ValueError, match="cannot hold one token"):
        uc.tokens_per_image_for_budget([384, 768, 768], 100_000, 1e6)


def test_metadata_contents(tmp_path, make_fake_backbone, write_coded_images):
    images = usae_images.list_images(write_coded_images(tmp_path / "imgs", 3))
    backbones = pair(make_fake_backbone)
    cache = build(backbones, images, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta == cache.metadata and meta["complete"] is True
    assert meta["format"] == usae_cache_files.CACHE_FORMAT and meta["grid"] == 14
    assert meta["tokens_per_image"] == 196 and meta["n_tokens"] == 3 * 196
    assert meta["bytes_per_image"] == 2 * 196 * 20
    assert meta["images"]["paths"] == list(images.paths)
    assert meta["images"]["sha256"] == images.sha256()
    for model, backbone in zip(meta["models"], backbones):
        assert model["describe"] == json.loads(json.dumps(backbone.describe()))
        assert model["preprocessing"] == json.loads(
            json.dumps(dataclasses.asdict(backbone.preprocessing)))
        assert model["layer"] == "conv16" and model["width"] == backbone.width
    assert not (tmp_path / "c" / "progress.json").exists()


def test_standardization_matches_numpy(tmp_path, make_fake_backbone, write_coded_images):
    images = usae_images.list_images(write_coded_images(tmp_path / "imgs", 10))
    for stats_sample in (4, 1000):
        cache = build(pair(make_fake_backbone), images, tmp_path / f"c{stats_sample}",
                      stats_sample=stats_sample, tokens_per_image=30)
        sample = cache.metadata["standardization"]["sample_images"]
        assert len(sample) == min(stats_sample, 10)
        rows = np.isin(cache.image_of_row(), sample)
        for name, (mean, std) in cache.standardization.items():
            values = np.asarray(cache.arrays[name][rows], dtype=np.float64)
            assert mean == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
            assert std == pytest.approx(values.std(ddof=1), rel=1e-12)
        for name, means in usae_loader.channel_means(cache).items():  # per-channel centring's means
            values = np.asarray(cache.arrays[name][rows], dtype=np.float64)
            np.testing.assert_allclose(means, values.mean(axis=0), rtol=1e-12, atol=1e-12)


def test_interrupted_build_resumes_byte_identical(tmp_path, make_fake_backbone,
                                                  write_coded_images):
    folder = write_coded_images(tmp_path / "imgs", 10)
    (folder / "img_004.png").write_bytes(b"not an image")  # a skip inside the run
    images = usae_images.list_images(folder)
    reference = tmp_path / "reference"
    build(pair(make_fake_backbone), images, reference, batch_size=3, tokens_per_image=60)

    class Crashing(make_fake_backbone):
        def forward(self, pixels):
            if self.calls == 2:  # third batch, after "alpha" already ran on it
                raise KeyboardInterrupt("simulated crash")
            return super().forward(pixels)

    resumed = tmp_path / "resumed"
    crashing = [make_fake_backbone("alpha", 8, 1), Crashing("beta", 12, 2)]
    with pytest.raises(KeyboardInterrupt):
        build(crashing, images, resumed, batch_size=3, tokens_per_image=60)
    assert not (resumed / "cache.json").exists()
    assert json.loads((resumed / "progress.json").read_text())["images_done"] == 6
    with pytest.raises(FileNotFoundError, match="unfinished.*resume"):
        uc.open_cache(resumed)

    backbones = pair(make_fake_backbone)
    build(backbones, images, resumed, batch_size=3, tokens_per_image=60)
    assert [bb.calls for bb in backbones] == [2, 2]  # only images 6..9 were computed
    assert read_bytes(resumed) == read_bytes(reference)


def test_non_finite_activations_skip_the_image_for_every_model(tmp_path, make_fake_backbone,
                                                               write_coded_images):
    class NaNForImage3(make_fake_backbone):
        def forward(self, pixels):
            out = super().forward(pixels)
            out[out[:, 0, 1] == 3] = float("nan")  # channel 1 holds the image identity
            return out

    images = usae_images.list_images(write_coded_images(tmp_path / "imgs", 5))
    cache = build([make_fake_backbone("alpha", 8, 1), NaNForImage3("beta", 12, 2)], images,
                  tmp_path / "c", tokens_per_image=10)
    assert cache.metadata["skipped"]["images"] == [
        {"index": 2, "path": "img_002.png", "reason": "activations not finite in float16 (NaN "
                                                      "or beyond +-65504) for some model"}]
    assert list(cache.kept_images) == [0, 1, 3, 4] and cache.n_tokens == 40
    assert (np.asarray(cache.arrays["alpha"][:, 1]) == np.repeat([1, 2, 4, 5], 10)).all()
    assert (np.asarray(cache.arrays["beta"][:, 1]) == np.repeat([1, 2, 4, 5], 10)).all()


def test_bad_arguments(tmp_path, make_fake_backbone, write_coded_images):
    images = usae_images.list_images(write_coded_images(tmp_path / "imgs", 2))

    class WrongShape(make_fake_backbone):
        def forward(self, pixels):
            return super().forward(pixels)[:, 1:]  # e.g. a CLS token dropped twice

    with pytest.raises(ValueError, match="distinct"):
        build([make_fake_backbone("a", 4), make_fake_backbone("a", 5)], images, tmp_path / "a")
    with pytest.raises(ValueError, match="tokens_per_image"):
        build(pair(make_fake_backbone), images, tmp_path / "b", tokens_per_image=197)
    with pytest.raises(ValueError, match="returned shape"):
        build([WrongShape("a", 4)], images, tmp_path / "c")


def test_mismatch_is_refused_and_rebuild_works(tmp_path, make_fake_backbone,
                                               write_coded_images):
    images = usae_images.list_images(write_coded_images(tmp_path / "imgs", 5))
    out = tmp_path / "c"
    build(pair(make_fake_backbone), images, out, tokens_per_image=20)

    again = pair(make_fake_backbone)
    build(again, images, out, tokens_per_image=20)  # same request: opened, nothing computed
    assert [bb.calls for bb in again] == [0, 0]

    with pytest.raises(CacheMismatchError, match=r"(?s)tokens_per_image: cached 20, "
                                                 r"requested 196.*rebuild=True"):
        build(pair(make_fake_backbone), images, out)
    with pytest.raises(CacheMismatchError, match=r"model 'beta': describe"):
        build(pair(make_fake_backbone, seed_b=3), images, out, tokens_per_image=20)
    with pytest.raises(CacheMismatchError, match="models: cached"):
        build([make_fake_backbone("alpha", 8, 1)], images, out, tokens_per_image=20)
    subset = usae_images.ImageSet(images.root, images.paths[:4], images.labels[:4])
    with pytest.raises(CacheMismatchError, match="image list"):
        build(pair(make_fake_backbone), subset, out, tokens_per_image=20)

    cache = build(pair(make_fake_backbone), subset, out, rebuild=True)
    assert cache.tokens_per_image == 196 and len(cache.kept_images) == 4
    assert uc.open_cache(out).n_tokens == 4 * 196

    class Crashing(make_fake_backbone):
        def forward(self, pixels):
            raise KeyboardInterrupt

    unfinished = tmp_path / "unfinished"
    with pytest.raises(KeyboardInterrupt):
        build([Crashing("alpha", 8, 1)], images, unfinished)
    with pytest.raises(CacheMismatchError, match="unfinished cache"):
        build([make_fake_backbone("alpha", 8, 1)], images, unfinished, tokens_per_image=9)
    assert build([make_fake_backbone("alpha", 8, 1)], images, unfinished,
                 tokens_per_image=9, rebuild=True).n_tokens == 5 * 9
    assert sorted(p.name for p in unfinished.iterdir()) == [
        "alpha.npy", "cache.json", "kept_images.npy", "positions.npy"]


def test_the_request_hash_names_the_cache(tmp_path, make_fake_backbone, write_coded_images):
    """cache.json stores the sha256 of the request, and that hash decides; a cache written
    before the hash was stored is named by the hash of the request its fields record."""
    images = usae_images.list_images(write_coded_images(tmp_path / "imgs", 3))
    out = tmp_path / "c"
    cache = build(pair(make_fake_backbone), images, out, tokens_per_image=20)
    recorded = cache.metadata["request_sha256"]
    assert recorded == usae_io.sha256_json(usae_cache_files.request_of(cache.metadata))

    def rewrite(change):
        metadata = json.loads((out / "cache.json").read_text())
        change(metadata)
        metadata["checksums"]["metadata_sha256"] = usae_cache_verify.metadata_digest(metadata)
        (out / "cache.json").write_text(json.dumps(metadata))

    rewrite(lambda m: m.pop("request_sha256"))
    again = pair(make_fake_backbone)
    build(again, images, out, tokens_per_image=20)  # same request: opened, nothing computed
    assert [bb.calls for bb in again] == [0, 0]
    with pytest.raises(CacheMismatchError, match="tokens_per_image: cached 20"):
        build(pair(make_fake_backbone), images, out)

    rewrite(lambda m: m.update(request_sha256="0" * 64))
    with pytest.raises(CacheMismatchError, match="request sha256: cached 0000"):
        build(pair(make_fake_backbone), images, out, tokens_per_image=20)


def test_real_photos(shared_data_dir, tmp_path, make_fake_backbone):
    listed = usae_images.list_images(shared_data_dir / "imagenet-200x5")
    images = usae_images.ImageSet(listed.root, listed.paths[::125], listed.labels[::125])
    cache = build(pair(make_fake_backbone), images, tmp_path / "c", tokens_per_image=64)
    assert cache.metadata["skipped"]["count"] == 0 and cache.n_tokens == 8 * 64
    for mean, std in cache.standardization.values():
        assert np.isfinite(mean) and std > 0


# ----------------------------------------------------------------------------------------------
# Interruption: SIGKILL at a random moment, then resume


EXTRACT = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import FakeBackbone
import usae_cache as uc
import usae_cache_verify as cv

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
    hashes = cv.block_hashes
    def slow_hashes(*args, **kwargs):
        open(log + ".finalizing", "w").close()
        time.sleep(1.0)
        return hashes(*args, **kwargs)
    cv.block_hashes = slow_hashes

uc.build_cache([Slow("alpha", 8, 1), Slow("beta", 12, 2)], images, out, batch_size=2,
               tokens_per_image=60, progress=False, workers=1)
"""


def test_a_second_builder_of_the_same_cache_is_refused_and_nothing_changes(images, reference,
                                                                          tmp_path):
    """Two processes on one cache (a notebook while run_all.sh runs): the second gets a clear
    refusal naming the first, the first's files stay untouched, and its kill blocks nothing."""
    out = tmp_path / "cache"
    process = holder(out / usae_cache_files.LOCK_FILE)
    try:
        with pytest.raises(usae_io.BusyError, match=f"process {process.pid} on .* since"):
            build_pair(images, out)
        assert [p.name for p in out.iterdir()] == [usae_cache_files.LOCK_FILE]
    finally:
        process.kill()
        process.wait()
    build_pair(images, out)
    assert read_bytes(out) == read_bytes(reference)


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


# ----------------------------------------------------------------------------------------------
# Storage faults: a clear error naming the path, never a half-written file under a final name,
# and the work resumes once the disk is fixed


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
        build_pair(images, out)
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
        build_pair(images, out)
    assert_clean_failure(error, out / "alpha.npy.partial", out, errno.ENOSPC)
    assert json.loads((out / "progress.json").read_text())["images_done"] == 6
    assert not (out / "alpha.npy").exists()  # arrays keep their final name until complete
    monkeypatch.undo()
    build_pair(images, out)
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_failure_writing_cache_json_keeps_the_cache_unfinished_and_resumable(
        images, reference, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    fail_on(monkeypatch, os, "replace", errno.ENOSPC, named("cache.json"))
    with pytest.raises(OSError) as error:
        build_pair(images, out)
    assert_clean_failure(error, out / "cache.json", out, errno.ENOSPC)
    with pytest.raises(FileNotFoundError, match="unfinished"):
        uc.open_cache(out)
    monkeypatch.undo()
    build_pair(images, out)
    assert folder_bytes(out) == folder_bytes(reference)


# ----------------------------------------------------------------------------------------------
# Damaged metadata and bad images met by a build


def test_build_cache_on_damaged_metadata_says_rebuild_and_rebuild_repairs(small_cache,
                                                                         tmp_path):
    folder = copy_of(small_cache, tmp_path)
    metadata = json.loads((folder / "cache.json").read_text())
    images = Path(metadata["images"]["root"])
    truncate(folder / "cache.json", 200)
    with pytest.raises(CorruptCacheError, match="rebuild=True"):
        build_pair(images, folder, batch_size=4)
    build_pair(images, folder, batch_size=4, rebuild=True)
    assert folder_bytes(folder) == folder_bytes(small_cache)


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

    cache = build_pair(folder, tmp_path / "cache", batch_size=8, tokens_per_image=4)
    listed = usae_images.list_images(folder)
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
# Bad configuration, refused before any long work


BUILD_CASES = [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer"),
    ({"tokens_per_image": 0}, "tokens_per_image must be within 1..196"),
    ({"tokens_per_image": 197}, "tokens_per_image must be within 1..196"),
    ({"stats_sample": -1}, "stats_sample must be a positive integer"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ({"seed": "0"}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ({"seed": 2**63}, r"seed must be an integer in \[0, 2\*\*63\)"),
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


def test_open_cache_refuses_an_unknown_mode(small_cache):
    with pytest.raises(ValueError, match="verify='quick' is not one of"):
        uc.open_cache(small_cache, verify="quick")


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "0"])
def test_open_cache_refuses_a_bad_seed(seed, small_cache):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        uc.open_cache(small_cache, seed=seed)
