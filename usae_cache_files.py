"""The files of an activation cache, and how a build writes them so that nothing is lost.

``usae_cache`` describes a cache folder's layout; this module holds its file names and

- the request that names a cache: everything that decides its content (models, image list,
  grid, tokens per image, seeds), whose sha256 ``cache.json`` and ``progress.json`` store.
  :func:`check_request` refuses a cache made for another request (:class:`CacheMismatchError`)
  and only then works out what differs;
- the crash-safe writes of a build: :func:`open_partial` allocates the arrays as
  ``<file>.partial`` memory maps (or reopens them where a killed build stopped) and
  :func:`save_batch` appends each batch of rows, its disk blocks reserved first (a full disk is
  an error, not a SIGBUS), before ``progress.json`` is atomically replaced to say so; storage
  failures name the file (:func:`writing`), and :func:`remove_cache` clears a cache, with what
  killed writes left, for a rebuild;
- :func:`finalize`, the end of a build: shrink the arrays, write the index files and the
  standardisation statistics, record the checksums (``usae_cache_verify``), give the arrays
  their final names and write ``cache.json`` last.

Of the project this module imports ``usae_io`` (atomic writes, hashes), ``usae_cache_verify``
(checksums), ``usae_images.ImageSet`` and ``usae_core.STD_EPS``; ``usae_cache`` builds on it.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

import usae_cache_verify as integrity
import usae_io
from usae_cache_verify import CorruptCacheError
from usae_core import STD_EPS
from usae_images import ImageSet

CACHE_FORMAT = "usae-cache/1"
DTYPE = np.dtype(np.float16)
METADATA_FILE = "cache.json"
PROGRESS_FILE = "progress.json"
KEPT_FILE = "kept_images.npy"
POSITIONS_FILE = "positions.npy"
PARTIAL_SUFFIX = ".partial"  # arrays being filled by a build
LOCK_FILE = ".lock"  # held by the one process that builds the cache (usae_io.exclusive)
_FIXED_FILES = (METADATA_FILE, PROGRESS_FILE, KEPT_FILE, POSITIONS_FILE)
# Independent random streams derived from the one user seed.
_POSITIONS_STREAM, _STATS_STREAM = 1, 2
_RESUMES = " (an interrupted build resumes where it stopped)"


def cache_bytes_per_image(widths: Iterable[int], tokens_per_image: int) -> int:
    """Bytes one image takes in a cache: 2 (fp16) x tokens x sum of widths.

    The paper's trio (384 + 768 + 768) with all 196 tokens takes 752,640 bytes per image.
    """
    return DTYPE.itemsize * int(tokens_per_image) * sum(int(w) for w in widths)


# ----------------------------------------------------------------------------------------------
# The request that names a cache


class CacheMismatchError(ValueError):
    """An existing cache was made for other models, images or token settings."""


def json_normal(value: Any) -> Any:
    """What ``value`` reads back as from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def request_for(models: list[dict], images: ImageSet, grid: int, tokens: int, seed: int,
                stats_sample: int) -> dict:
    """Everything that decides the cache's content; its sha256 names the cache."""
    return json_normal({
        "format": CACHE_FORMAT,
        "dtype": DTYPE.name,
        "models": models,
        "images_sha256": images.sha256(),
        "n_images": len(images),
        "grid": grid,
        "tokens_per_image": tokens,
        # The seed only matters where it draws something: spurious mismatches help nobody.
        "positions_seed": seed if tokens < grid * grid else None,
        "stats_sample": stats_sample,
        "stats_seed": seed if len(images) > stats_sample else None,
    })


_MODEL_IDENTITY = ("name", "width", "layer", "grid", "preprocessing", "describe")


def request_of(metadata: dict) -> dict:
    """The request a complete cache was built for, read back from its metadata."""
    return {
        "format": metadata.get("format"),
        "dtype": metadata.get("dtype"),
        "models": [{k: m.get(k) for k in _MODEL_IDENTITY} for m in metadata.get("models", [])],
        "images_sha256": metadata.get("images", {}).get("sha256"),
        "n_images": metadata.get("images", {}).get("count"),
        **{k: metadata.get(k) for k in ("grid", "tokens_per_image", "positions_seed",
                                        "stats_sample", "stats_seed")},
    }


def _differences(found: dict, wanted: dict) -> list[str]:
    lines = []
    for key in wanted.keys() | found.keys():
        old, new = found.get(key), wanted.get(key)
        if old == new:
            continue
        if key == "models" and isinstance(old, list) and isinstance(new, list):
            old_names = [m.get("name") for m in old]
            new_names = [m.get("name") for m in new]
            if old_names != new_names:
                lines.append(f"models: cached {old_names}, requested {new_names}")
            for a, b in zip(old, new):
                if a != b:
                    fields = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                    lines.append(f"model {b.get('name')!r}: {', '.join(fields)} differ "
                                 f"(cached {[a.get(k) for k in fields]}, "
                                 f"requested {[b.get(k) for k in fields]})")
        elif key == "images_sha256":
            lines.append(f"image list: cached sha256 {str(old)[:12]}..., requested "
                         f"{str(new)[:12]}... (different files, order or labels)")
        else:
            lines.append(f"{key}: cached {old!r}, requested {new!r}")
    return sorted(lines)


def check_request(record: dict, request: dict, folder: Path, *, unfinished: bool = False) -> None:
    """Refuse the cache in ``folder`` if its ``cache.json`` (or, ``unfinished``, its
    ``progress.json``), ``record``, names another request than ``request``.

    The sha256 of the requests decide; only when they differ is it worked out how.
    """
    found = record.get("request") if unfinished else request_of(record)
    # Records written before the hash was stored are named by the hash of what they hold.
    recorded = record.get("request_sha256") or usae_io.sha256_json(found)
    wanted = usae_io.sha256_json(request)
    if recorded == wanted:
        return
    diff = _differences(found or {}, request) or [
        f"request sha256: cached {str(recorded)[:12]}..., requested {wanted[:12]}... (the "
        "recorded fields agree: the record was edited)"]
    what = "an unfinished cache" if unfinished else "the cache"
    raise CacheMismatchError(
        f"{what} in {folder} was made with other settings:\n  - " + "\n  - ".join(diff) +
        "\nPass rebuild=True to replace it, or choose another out_dir.")


# ----------------------------------------------------------------------------------------------
# Files of a build


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A storage failure (no space, no permission, read-only disk) as an OSError that names
    the file and says what to do."""
    try:
        yield
    except OSError as error:
        if str(path) in str(error):  # already says which file (usae_io.atomic_write does)
            raise
        raise usae_io.writable_error(path, error, _RESUMES) from error


def partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def array_files(names: Sequence[str]) -> dict[str, str]:
    files = {name: (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model") + ".npy"
             for name in names}
    if len(set(files.values())) < len(files) or set(_FIXED_FILES) & set(files.values()):
        files = {name: f"model{i}.npy" for i, name in enumerate(names)}
    return files


def reserve(path: Path, start: int, length: int) -> None:
    """Allocate the disk blocks of bytes ``start .. start + length`` of ``path``.

    The arrays are sparse files written through memory maps: on a full disk such a write kills
    the process with SIGBUS, no message. Allocating first turns that into ENOSPC here.
    """
    if length <= 0 or not hasattr(os, "posix_fallocate"):
        return
    with writing(path):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, start, length)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # unsupported: skip
                raise
        finally:
            os.close(fd)


def _to_json(value: Any, indent: int = 0) -> str:
    """JSON with one key per line, but a list of plain values on one line (image lists)."""
    pad, end = " " * (indent + 1), "\n" + " " * indent
    if isinstance(value, dict) and value:
        items = (f"{pad}{json.dumps(k)}: {_to_json(v, indent + 1)}" for k, v in value.items())
        return "{\n" + ",\n".join(items) + end + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(pad + _to_json(v, indent + 1) for v in value) + end + "]"
    return json.dumps(value, ensure_ascii=False)


def write_json(path: Path, value: Any) -> None:
    usae_io.atomic_write(path, _to_json(value) + "\n")


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    usae_io.atomic_write(path, buffer.getvalue())


def remove_cache(folder: Path) -> None:
    """Delete the files of a cache (only those it lists: the folder may hold other things)."""
    names = set(_FIXED_FILES)
    for meta_name in (METADATA_FILE, PROGRESS_FILE):
        try:
            meta = json.loads((folder / meta_name).read_text(encoding="utf-8"))
            names.update(meta.get("files", {}).values())
        except (OSError, ValueError, AttributeError):
            pass
    for name in names:
        (folder / Path(name).name).unlink(missing_ok=True)
        partial(folder / Path(name).name).unlink(missing_ok=True)
    _remove_temporaries(folder, names)


def _remove_temporaries(folder: Path, names: Iterable[str]) -> None:
    """Delete what atomic writes of the cache's files (``names`` and the fixed ones) left
    behind when the process was killed (a SIGKILL gives them no chance to clean up)."""
    for name in {*_FIXED_FILES, *names}:
        for leftover in usae_io.stale_temporaries(folder / Path(name).name):
            leftover.unlink(missing_ok=True)


def open_partial(folder: Path, request: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """The progress and the writable arrays of the build of ``request`` in ``folder``: resumed
    where a previous build stopped, or allocated (after checking the free space).

    Returns
    -------
    state : dict
        What ``progress.json`` holds: the request and its sha256, the array files, and the
        ``images_done``, ``rows_done`` and ``skipped`` images so far.
    arrays : dict
        Model name -> (n_images * tokens_per_image, width) float16 memory map of the
        ``<file>.partial`` array.
    """
    widths = {model["name"]: model["width"] for model in request["models"]}
    n_images, rows = request["n_images"], request["n_images"] * request["tokens_per_image"]
    files = array_files(list(widths))
    paths = {name: partial(folder / files[name]) for name in widths}
    _remove_temporaries(folder, files.values())
    if not (folder / PROGRESS_FILE).exists():
        needed = n_images * cache_bytes_per_image(widths.values(), request["tokens_per_image"])
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise ValueError(
                f"the cache needs {needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB "
                "free; keep fewer tokens per image (tokens_per_image_for_budget) or fewer images.")
        arrays = {}
        try:
            for name, width in widths.items():
                with writing(paths[name]):
                    arrays[name] = np.lib.format.open_memmap(paths[name], mode="w+", dtype=DTYPE,
                                                             shape=(rows, width))
            state = {"format": CACHE_FORMAT, "request": request,
                     "request_sha256": usae_io.sha256_json(request), "files": files,
                     "images_done": 0, "rows_done": 0, "skipped": []}
            write_json(folder / PROGRESS_FILE, state)
        except BaseException:  # nothing done yet: leave nothing behind
            arrays.clear()
            for path in [*paths.values(), folder / PROGRESS_FILE]:
                path.unlink(missing_ok=True)
            raise
        return state, arrays

    state = integrity.read_json(folder / PROGRESS_FILE)
    check_request(state, request, folder, unfinished=True)
    if not {"images_done", "rows_done", "skipped"} <= set(state):
        raise CorruptCacheError(f"{folder / PROGRESS_FILE} lacks the build's progress; "
                                "pass rebuild=True.")
    for name in files.values():  # a build killed while finalizing had renamed some
        if not partial(folder / name).exists() and (folder / name).exists():
            with writing(folder / name):
                os.replace(folder / name, partial(folder / name))
    arrays = {}
    for name, width in widths.items():
        try:
            arrays[name] = np.load(paths[name], mmap_mode="r+")
        except (OSError, ValueError) as error:
            raise CorruptCacheError(f"the unfinished cache in {folder} lacks a readable "
                                    f"{paths[name].name} ({error}); pass "
                                    "rebuild=True.") from error
        if state["images_done"] < n_images and arrays[name].shape != (rows, width):
            raise ValueError(f"{files[name]} in {folder} has shape {arrays[name].shape}, "
                             f"expected {(rows, width)}; pass rebuild=True.")
    return state, arrays


def save_batch(folder: Path, state: dict, arrays: dict[str, np.ndarray],
               blocks: dict[str, np.ndarray], images_done: int) -> None:
    """Append a batch's rows (model name -> rows, none if all its images were skipped) to the
    arrays, then record in ``progress.json`` that ``images_done`` images are done."""
    rows = state["rows_done"]
    for name, block in blocks.items():
        reserve(partial(folder / state["files"][name]),
                arrays[name].offset + rows * block[0].nbytes, block.nbytes)
        arrays[name][rows:rows + len(block)] = block
    for name, array in arrays.items():
        with writing(partial(folder / state["files"][name])):
            array.flush()  # data on disk before the progress file says it is
    state["rows_done"] = rows + (len(next(iter(blocks.values()))) if blocks else 0)
    state["images_done"] = images_done
    write_json(folder / PROGRESS_FILE, state)


def _shrink_npy(path: Path, rows: int) -> None:
    """Cut a pre-allocated ``.npy`` file to its first ``rows`` rows, in place.

    numpy pads the header so the first axis can grow to any size without moving the data, so
    only the header and the file length change.
    """
    fmt = np.lib.format
    with open(path, "r+b") as handle:
        version = fmt.read_magic(handle)
        read, write = ((fmt.read_array_header_1_0, fmt.write_array_header_1_0) if version == (1, 0)
                       else (fmt.read_array_header_2_0, fmt.write_array_header_2_0))
        shape, fortran, dtype = read(handle)
        offset = handle.tell()
        if shape[0] != rows:
            header = io.BytesIO()
            write(header, {"descr": fmt.dtype_to_descr(dtype), "fortran_order": fortran,
                           "shape": (rows, *shape[1:])})
            assert len(header.getvalue()) == offset, f"{path}: the header changed size"
            handle.seek(0)
            handle.write(header.getvalue())
        # Always: a build killed between the two writes left the new header on the old length.
        handle.truncate(offset + rows * int(np.prod(shape[1:])) * dtype.itemsize)
        handle.flush()
        os.fsync(handle.fileno())  # an in-place edit: no atomic rename makes it durable


# ----------------------------------------------------------------------------------------------
# Kept positions, statistics and the end of a build


def token_positions(seed: int, image_index: int, grid_tokens: int, tokens: int) -> np.ndarray:
    """Seeded kept positions of one image, sorted (raster order); one draw serves all models."""
    rng = np.random.default_rng([seed, _POSITIONS_STREAM, image_index])
    return np.sort(rng.choice(grid_tokens, size=tokens, replace=False)).astype(np.int16)


def statistics_sample(seed: int, count: int, sample: int) -> np.ndarray:
    """Sorted indices of the ``min(sample, count)`` images, of ``count``, whose tokens give the
    standardisation statistics: seeded, so that a cache and a stream draw the same images."""
    return np.sort(np.random.default_rng([seed, _STATS_STREAM]).choice(
        count, size=min(sample, count), replace=False))


def scalar_stats(array: np.ndarray, blocks: Sequence[int], tokens: int) -> tuple[float, float]:
    """Scalar mean and unbiased std over all entries of the given row blocks, in float64.

    Two passes (mean, then squared deviations) instead of sum and sum of squares, which loses
    the std to cancellation when the mean is large; reads 64 images at a time.
    """
    width = array.shape[1]
    groups = [np.asarray(blocks[i:i + 64]) for i in range(0, len(blocks), 64)]

    def rows(group: np.ndarray) -> np.ndarray:
        return np.asarray(array[(group[:, None] * tokens + np.arange(tokens)).ravel()],
                          dtype=np.float64)

    count = len(blocks) * tokens * width
    mean = sum(rows(group).sum() for group in groups) / count
    squares = sum(np.square(rows(group) - mean).sum() for group in groups)
    return float(mean), float(math.sqrt(squares / max(1, count - 1)))


def finalize(folder: Path, request: dict, models: list[dict], images: ImageSet, grid: int,
             tokens: int, seed: int, stats_sample: int, skipped: list[dict],
             build: dict, rows_done: int | None = None, *, hash_content: bool = True) -> None:
    """Shrink the arrays, write the index files and statistics, hash everything, give the
    arrays their final names, then write ``cache.json``.

    The arrays arrive as ``<file>.partial``. ``hash_content=False`` records sizes only.
    """
    files = array_files([m["name"] for m in models])
    skipped = sorted(skipped, key=lambda item: item["index"])
    bad = {item["index"] for item in skipped}
    kept = np.array([i for i in range(len(images)) if i not in bad], dtype=np.int32)
    if kept.size == 0:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        raise ValueError(f"no image of {images.root} could be used ({len(skipped)} skipped, e.g. "
                         f"{reasons}); check the folder.")
    n_tokens = int(kept.size) * tokens
    if rows_done is not None and rows_done != n_tokens:
        raise RuntimeError(f"the cache in {folder} holds {rows_done} rows but {kept.size} kept "
                           f"images x {tokens} tokens = {n_tokens}; pass rebuild=True.")
    for name in files.values():
        with writing(partial(folder / name)):
            _shrink_npy(partial(folder / name), n_tokens)
    _save_npy(folder / KEPT_FILE, kept)
    index_files = {"kept_images": KEPT_FILE}
    if tokens < grid * grid:
        _save_npy(folder / POSITIONS_FILE,
                  np.stack([token_positions(seed, int(i), grid * grid, tokens) for i in kept]))
        index_files["positions"] = POSITIONS_FILE

    # Statistics over whole images, as the released code: a seeded sample of kept images.
    sample = statistics_sample(seed, kept.size, stats_sample)
    for model in models:
        array = np.load(partial(folder / files[model["name"]]), mmap_mode="r")
        model["mean"], model["std"] = scalar_stats(array, sample, tokens)
        del array

    metadata = {
        "format": CACHE_FORMAT,
        "complete": True,
        "request_sha256": usae_io.sha256_json(request),
        "dtype": DTYPE.name,
        "grid": grid,
        "tokens_per_image": tokens,
        "positions_seed": request["positions_seed"],
        "token_positions": ("all, row-major" if tokens == grid * grid else
                            f"seeded draw without replacement, sorted; see {POSITIONS_FILE}"),
        "bytes_per_image": cache_bytes_per_image([m["width"] for m in models], tokens),
        "n_tokens": n_tokens,
        "n_images_kept": int(kept.size),
        "models": [{**m, "file": files[m["name"]]} for m in models],
        "stats_sample": stats_sample,
        "stats_seed": request["stats_seed"],
        "standardization": {
            "kind": "one scalar mean and one scalar unbiased std per model over every cached "
                    f"token of the sample images; apply (x - mean) / (std + {STD_EPS})",
            "sample_images": [int(kept[j]) for j in sample],
        },
        "files": {**files, **index_files},
        "build": build,
        "skipped": {"count": len(skipped), "images": skipped},
        "images": {"root": str(images.root), "sha256": images.sha256(), "count": len(images),
                   "paths": list(images.paths), "labels": list(images.labels)},
    }
    # What differs from a later request is read back from these fields.
    assert request_of(metadata) == request, "the metadata does not record the request"
    on_disk = {name: partial(folder / name) if name in files.values() else folder / name
               for name in metadata["files"].values()}
    metadata["checksums"] = integrity.checksums(on_disk, hash_content=hash_content)
    metadata["checksums"]["metadata_sha256"] = integrity.metadata_digest(metadata)
    for name in files.values():
        with writing(folder / name):
            os.replace(partial(folder / name), folder / name)
    usae_io.fsync_dir(folder)
    write_json(folder / METADATA_FILE, metadata)
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
