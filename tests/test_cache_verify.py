"""Tests of usae_cache_verify: damaged, truncated, edited or forged cache files and planted
pickles are refused when a cache is opened (or rebuilt over), naming the file and the remedy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import usae_cache as uc
import usae_cache_verify as cv
from conftest import build_pair, copy_of, flip, truncate, write_images

# ----------------------------------------------------------------------------------------------
# Damaged files and metadata


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
        with pytest.raises(cv.CorruptCacheError, match=message) as error:
            uc.open_cache(folder, verify=verify)
        assert "rebuild=True" in str(error.value)


def edit_metadata(folder: Path, change, *, keep_checksum: bool = False) -> None:
    path = folder / "cache.json"
    metadata = json.loads(path.read_text())
    change(metadata)
    if keep_checksum:  # a careful forger: the metadata's own checksum made consistent again
        metadata["checksums"]["metadata_sha256"] = cv.metadata_digest(metadata)
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
    with pytest.raises(cv.CorruptCacheError, match=message) as error:
        uc.open_cache(folder, verify="size")
    assert str(folder) in str(error.value) and "rebuild" in str(error.value)


def test_caches_without_content_checksums_open_on_sizes_and_shapes(small_cache, tmp_path):
    """Caches built before checksums existed, and synthetic ones, still open (sizes and shapes
    checked) but cannot be fully verified, and say so."""
    folder = copy_of(small_cache, tmp_path)
    edit_metadata(folder, lambda m: m.pop("checksums"))
    uc.open_cache(folder)
    with pytest.raises(ValueError, match="no checksums"):
        uc.open_cache(folder, verify="full")
    truncate(folder / "beta.npy")
    with pytest.raises(cv.CorruptCacheError, match="beta.npy is not a readable numpy array"):
        uc.open_cache(folder)

    synthetic_cache = tmp_path / "synthetic"
    uc.make_synthetic_cache(synthetic_cache, {"a": 4, "b": 6}, 3, stats_sample=2)
    flip(synthetic_cache / "a.npy", 500)
    uc.open_cache(synthetic_cache)  # content unchecked by design (tests edit these in place)
    with pytest.raises(ValueError, match="verify='size'"):
        uc.open_cache(synthetic_cache, verify="full")
    truncate(synthetic_cache / "b.npy")
    with pytest.raises(cv.CorruptCacheError, match="truncated"):
        uc.open_cache(synthetic_cache)


def test_auto_verification_samples_blocks_of_a_large_cache(tmp_path, monkeypatch):
    """Above AUTO_FULL_BYTES ``auto`` hashes the first, the last and a seeded draw of the other
    blocks of each file (never more than SAMPLE_BLOCKS), so a 1 TB cache opens in seconds:
    truncation and damaged ends are always caught, a damaged middle block sometimes."""
    monkeypatch.setattr(cv, "CHECKSUM_BLOCK", 512)
    build_pair(write_images(tmp_path / "images", 6), tmp_path / "cache", batch_size=4)
    monkeypatch.setattr(cv, "AUTO_FULL_BYTES", 0)
    monkeypatch.setattr(cv, "SAMPLE_BLOCKS", 6)
    beta = tmp_path / "cache" / "beta.npy"
    blocks = -(-beta.stat().st_size // 512)
    assert blocks == 18
    hashed = []
    original = cv.block_hashes
    monkeypatch.setattr(cv, "block_hashes", lambda path, block, indices=None: (
        hashed.append((path.name, list(indices))) or original(path, block, indices)))
    uc.open_cache(tmp_path / "cache", seed=0)
    assert all(len(chosen) <= 6 for _, chosen in hashed)
    assert dict(hashed)["beta.npy"][0] == 0 and dict(hashed)["beta.npy"][-1] == blocks - 1

    for offset in (200, beta.stat().st_size - 1):  # first and last block: always hashed
        flip(beta, offset)
        for seed in range(5):
            with pytest.raises(cv.CorruptCacheError, match="beta.npy: bytes"):
                uc.open_cache(tmp_path / "cache", seed=seed)
        flip(beta, offset)

    flip(beta, 9 * 512 + 7)  # a middle block
    caught = 0
    for seed in range(40):
        try:
            uc.open_cache(tmp_path / "cache", seed=seed)
        except cv.CorruptCacheError:
            caught += 1
    assert 0 < caught < 40  # sampled: 4 of the 16 middle blocks per open
    with pytest.raises(cv.CorruptCacheError, match=r"bytes 4,608\.\.5,120"):
        uc.open_cache(tmp_path / "cache", verify="full")


# ----------------------------------------------------------------------------------------------
# Planted pickles: refused, never run


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
        with pytest.raises(cv.CorruptCacheError):
            uc.open_cache(folder, verify=verify)
    if name == "cache.json":
        images = Path(json.loads((small_cache / "cache.json").read_text())["images"]["root"])
        with pytest.raises(cv.CorruptCacheError):
            build_pair(images, folder, batch_size=4)
    assert not marker.exists()


def test_a_pickle_planted_in_an_unfinished_cache_is_refused(payload, images, tmp_path):
    marker, data = payload
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "progress.json").write_bytes(data)
    with pytest.raises(cv.CorruptCacheError):
        uc.open_cache(unfinished)
    with pytest.raises(cv.CorruptCacheError):
        build_pair(images, unfinished)
    assert not marker.exists()
