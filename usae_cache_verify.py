"""Integrity of an activation cache: the checksums a build records and their verification.

``cache.json`` records the size and the sha256 of every :data:`CHECKSUM_BLOCK` (16 MiB) block of
every other file of the cache, and a sha256 of its own content (:func:`checksums`,
:func:`metadata_digest`). Opening a cache (``usae_cache.open_cache``) always runs the cheap
checks, :func:`check_metadata` and :func:`check_sizes`, and by default hashes content with
:func:`check_content`: every block up to :data:`AUTO_FULL_BYTES` (2 GiB), a sample of blocks
above. Whatever is found damaged, truncated or altered raises :class:`CorruptCacheError`, naming
the file and the remedy. Nothing is ever unpickled: arrays are read with ``allow_pickle=False``
(:func:`load_npy`) and metadata is JSON (:func:`read_json`).

Of the project this module imports ``usae_io`` (the canonical JSON hash); ``usae_cache`` builds
on it.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

import usae_io

# Block size of the recorded sha256s; the cache size up to which ``verify="auto"`` hashes
# everything, and the blocks per file it hashes above that.
CHECKSUM_BLOCK = 16 * 2**20
AUTO_FULL_BYTES = 2 * 2**30
SAMPLE_BLOCKS = 8
VERIFY_MODES = ("auto", "full", "size")
REBUILD = ("rebuild it with build_cache(..., rebuild=True) (or make_synthetic_cache), or "
           "restore the folder from a copy")

_NUMBER = (int, float)
_REQUIRED = {"n_tokens": int, "grid": int, "tokens_per_image": int, "n_images_kept": int,
             "models": list, "files": dict, "images": dict}
_REQUIRED_MODEL = {"name": str, "width": int, "file": str, "mean": _NUMBER, "std": _NUMBER}


class CorruptCacheError(ValueError):
    """A cache whose files are damaged, truncated or altered since it was built."""


def read_json(path: Path) -> dict:
    """A JSON object from a file of the cache, or a :class:`CorruptCacheError` that says so."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # invalid JSON or not UTF-8 text (e.g. a pickle put there)
        raise CorruptCacheError(f"{path} is not valid JSON ({error}): the file is damaged; "
                                f"{REBUILD}.") from error
    if not isinstance(value, dict):
        raise CorruptCacheError(f"{path} holds a JSON {type(value).__name__}, not an object: "
                                f"the file is damaged; {REBUILD}.")
    return value


def load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` without pickles, or a :class:`CorruptCacheError` naming the file."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise CorruptCacheError(f"{path} is not a readable numpy array ({error}); "
                                f"{REBUILD}.") from error


# ----------------------------------------------------------------------------------------------
# Recording, at the end of a build


def block_hashes(path: Path, block: int, indices: Iterable[int] | None = None) -> list[str]:
    """sha256 of blocks ``indices`` (all by default) of ``block`` bytes of a file, in order.

    Threads share the work (hashlib and reads release the GIL), so hashing a large cache at the
    end of its build runs at disk speed rather than one core's hashing speed.
    """
    count = max(1, -(-path.stat().st_size // block))
    indices = list(range(count) if indices is None else indices)
    fd = os.open(path, os.O_RDONLY)
    try:
        def digest(index: int) -> str:
            return hashlib.sha256(os.pread(fd, block, index * block)).hexdigest()

        if len(indices) == 1:
            return [digest(indices[0])]
        with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            return list(pool.map(digest, indices))
    finally:
        os.close(fd)


def checksums(files: Mapping[str, Path], *, hash_content: bool = True) -> dict:
    """The ``checksums`` entry of ``cache.json`` for ``files`` (recorded name -> path now).

    ``hash_content=False`` records sizes only (synthetic caches, which tests edit in place).
    """
    return {"algorithm": "sha256", "block_bytes": CHECKSUM_BLOCK,
            "files": {name: {"bytes": path.stat().st_size,
                             **({"blocks": block_hashes(path, CHECKSUM_BLOCK)} if hash_content
                                else {})}
                      for name, path in files.items()}}


def metadata_digest(metadata: dict) -> str:
    """sha256 of the metadata without this digest itself, in a canonical JSON form."""
    body = json.loads(json.dumps(metadata))
    body.get("checksums", {}).pop("metadata_sha256", None)
    return usae_io.sha256_json(body)


# ----------------------------------------------------------------------------------------------
# Verification, when a cache is opened


def check_metadata(metadata: dict, path: Path) -> None:
    """Every key the cache is read with is there, with the right type."""
    def check(value: Any, key: str, kind: type | tuple, where: str = "") -> None:
        if isinstance(value, bool) or not isinstance(value, kind):
            raise CorruptCacheError(f"{path} has no valid {key!r}{where} (found {value!r:.60}): "
                                    f"the file is damaged or was edited; {REBUILD}.")

    for key, kind in _REQUIRED.items():
        check(metadata.get(key), key, kind)
    check(metadata["models"] or None, "models", list, " (no model)")
    for model in metadata["models"]:
        check(model, "models", dict, " entry")
        for key, kind in _REQUIRED_MODEL.items():
            check(model.get(key), key, kind, f" for model {model.get('name')!r}")
    check(metadata["files"].get("kept_images"), "kept_images", str, " in 'files'")
    for name in [*(m["file"] for m in metadata["models"]), *metadata["files"].values()]:
        if not isinstance(name, str) or Path(name).name != name:  # no path leaves the folder
            check(None, "files", str, f" (bad file name {name!r})")


def check_sizes(meta_path: Path, metadata: dict) -> None:
    """The metadata's own checksum and the size of every file: cheap, always done."""
    checksums, folder = metadata["checksums"], meta_path.parent
    if not isinstance(checksums, dict) or checksums.get("metadata_sha256") != \
            metadata_digest(metadata):
        raise CorruptCacheError(f"{meta_path} differs from what the build wrote (its checksum "
                                f"does not match): it was edited or damaged; {REBUILD}.")
    try:  # one hash per block (if any), and no path that leaves the folder
        block = int(checksums["block_bytes"])
        for name, info in checksums["files"].items():
            count = max(1, -(-int(info["bytes"]) // block))
            if Path(name).name != name or len(info.get("blocks", [None] * count)) != count:
                raise ValueError(name)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as error:
        raise CorruptCacheError(f"{meta_path} holds malformed checksums ({error!r}); "
                                f"{REBUILD}.") from error
    for name, info in checksums["files"].items():
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != info["bytes"]:
            found = "missing" if size is None else f"{size:,} bytes"
            raise CorruptCacheError(f"{path} is {found}, the build wrote {info['bytes']:,} "
                                    f"bytes: it was truncated, replaced or deleted; "
                                    f"{REBUILD}.")


def _sample_blocks(count: int, rng: np.random.Generator) -> list[int]:
    """First and last block (headers, truncation) and a random draw of the others."""
    if count <= SAMPLE_BLOCKS:
        return list(range(count))
    middle = rng.choice(np.arange(1, count - 1), SAMPLE_BLOCKS - 2, replace=False)
    return [0, *sorted(int(i) for i in middle), count - 1]


def check_content(folder: Path, checksums: dict, verify: str, seed: int | None) -> None:
    """Hash every block (``full``, or ``auto`` on a small cache) or a sample (large cache)."""
    files = checksums["files"]
    if any("blocks" not in info for info in files.values()):
        if verify == "full":
            raise ValueError(f"the cache in {folder} records file sizes but no content "
                             "checksums (a synthetic cache): open it with verify='size'.")
        return
    block = int(checksums["block_bytes"])
    full = verify == "full" or sum(info["bytes"] for info in files.values()) <= AUTO_FULL_BYTES
    rng = np.random.default_rng(seed)
    for name, info in files.items():
        count = len(info["blocks"])
        chosen = list(range(count)) if full else _sample_blocks(count, rng)
        for index, digest in zip(chosen, block_hashes(folder / name, block, chosen)):
            if digest != info["blocks"][index]:
                start = index * block
                raise CorruptCacheError(
                    f"{folder / name}: bytes {start:,}..{min(start + block, info['bytes']):,} "
                    f"differ from the checksum recorded when the cache was built: the file was "
                    f"altered or damaged; {REBUILD}.")
