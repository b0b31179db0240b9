"""Images -> co-indexed activation cache on disk -> shuffled, token-aligned batches.

A USAE trains on the final-layer tokens of several vision models, and row ``t`` of every
model's activations must be the same image and 14x14 grid position. This module

1. lists and decodes images robustly (:func:`list_images`, :func:`default_images`,
   :func:`open_image`): a corrupt file is skipped with a reason, never a crash;
2. runs every backbone over every image once and stores one fp16 ``.npy`` array per model,
   memory-mapped, rows aligned across models by (image, token) (:func:`build_cache`). The
   build resumes after an interruption and ends byte-identical to an uninterrupted one;
3. streams shuffled, aligned batches from the arrays without loading them whole
   (:class:`TokenLoader`), so a cache larger than RAM trains fine.

On-disk layout of a cache folder::

    cache.json          metadata and checksums, written last and only once the cache is complete
    progress.json       during a build only: how many images are done (atomic writes)
    <model>.npy         (n_tokens, width) float16, one per model, same row order
                        (``<model>.npy.partial`` while the build runs: never a final name for
                        an unfinished file)
    kept_images.npy     (n_kept,) int32: index in the image list of each kept image
    positions.npy       (n_kept, T) int16: kept grid positions, only when T < grid*grid

Integrity: ``cache.json`` records the size and the sha256 of every 16 MiB block of every other
file, and a sha256 of its own content. :func:`open_cache` always checks sizes, shapes and the
metadata (cheap) and hashes the arrays by default: all of them up to 2 GiB, a sample of blocks
above (see its ``verify`` argument). Nothing is ever unpickled: arrays are read with
``allow_pickle=False`` and metadata is JSON.

Row ``r`` holds image ``kept_images[r // T]`` at grid position ``positions[r // T, r % T]``
(row-major on the grid). The standardisation statistics are one scalar mean and one scalar
unbiased std per model, over every cached token of a seeded sample of 1,000 images, as the
released code (spec section 2); the loader leaves the activations raw unless asked.

Of the project this module imports ``usae_io`` (atomic writes, hashes), ``usae_images`` and
``usae_core.STD_EPS``; backbones are used through their interface (``name``, ``width``,
``grid``, ``preprocessing``, ``preprocess``, ``forward``, ``describe``).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import usae_io
from usae_core import STD_EPS
# Re-exported: the image helpers were part of this module's interface before usae_images.
from usae_images import (IMAGE_EXTENSIONS, MAX_PIXELS, ImageSet, OpenedImage,  # noqa: F401
                         default_cache_dir, default_images, list_images, open_image,
                         shared_data_root)

CACHE_FORMAT = "usae-cache/1"
DTYPE = np.dtype(np.float16)
METADATA_FILE = "cache.json"
PROGRESS_FILE = "progress.json"
KEPT_FILE = "kept_images.npy"
POSITIONS_FILE = "positions.npy"
PARTIAL_SUFFIX = ".partial"  # arrays being filled by a build
# Integrity checks (see open_cache): block size of the recorded sha256s, the cache size up to
# which ``verify="auto"`` hashes everything, and the blocks per file it hashes above that.
CHECKSUM_BLOCK = 16 * 2**20
AUTO_FULL_BYTES = 2 * 2**30
SAMPLE_BLOCKS = 8
VERIFY_MODES = ("auto", "full", "size")
# Independent random streams derived from the one user seed.
_POSITIONS_STREAM, _STATS_STREAM = 1, 2


# ----------------------------------------------------------------------------------------------
# Sizes


def cache_bytes_per_image(widths: Iterable[int], tokens_per_image: int) -> int:
    """Bytes one image takes in a cache: 2 (fp16) x tokens x sum of widths.

    The paper's trio (384 + 768 + 768) with all 196 tokens takes 752,640 bytes per image.
    """
    return DTYPE.itemsize * int(tokens_per_image) * sum(int(w) for w in widths)


def tokens_per_image_for_budget(widths: Iterable[int], n_images: int, budget_bytes: float,
                                grid_tokens: int = 196) -> int:
    """Most tokens per image (at most ``grid_tokens``) that keep ``n_images`` within a budget.

    Raises
    ------
    ValueError
        Not even one token per image fits.
    """
    per_token = cache_bytes_per_image(widths, 1)
    tokens = int(budget_bytes // (per_token * max(1, int(n_images))))
    if tokens < 1:
        raise ValueError(f"a budget of {budget_bytes:,.0f} bytes cannot hold one token per image "
                         f"for {n_images:,} images ({per_token} bytes per token); raise the "
                         "budget or use fewer images.")
    return min(tokens, int(grid_tokens))


def _token_positions(seed: int, image_index: int, grid_tokens: int, tokens: int) -> np.ndarray:
    """Seeded kept positions of one image, sorted (raster order); one draw serves all models."""
    rng = np.random.default_rng([seed, _POSITIONS_STREAM, image_index])
    return np.sort(rng.choice(grid_tokens, size=tokens, replace=False)).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# Cache


class CacheMismatchError(ValueError):
    """An existing cache was made for other models, images or token settings."""


@dataclass(frozen=True)
class Cache:
    """A complete activation cache, opened read-only (see :func:`open_cache`).

    Attributes
    ----------
    path : Path
        The cache folder.
    metadata : dict
        The parsed ``cache.json``.
    arrays : dict
        Model name -> read-only memmap (n_tokens, width) of float16; row r is the same
        (image, position) in every array.
    standardization : dict
        Model name -> (mean, std): scalars over a seeded sample of images.
    kept_images : ndarray
        (n_kept,) index into the image list of each cached image, in row order.
    positions : ndarray
        (n_kept, tokens_per_image) grid positions kept for each cached image.
    """

    path: Path
    metadata: dict
    arrays: dict[str, np.ndarray]
    standardization: dict[str, tuple[float, float]]
    kept_images: np.ndarray
    positions: np.ndarray

    @property
    def names(self) -> list[str]:
        return list(self.arrays)

    @property
    def widths(self) -> dict[str, int]:
        return {name: int(array.shape[1]) for name, array in self.arrays.items()}

    @property
    def n_tokens(self) -> int:
        return int(self.metadata["n_tokens"])

    @property
    def tokens_per_image(self) -> int:
        return int(self.metadata["tokens_per_image"])

    @property
    def grid(self) -> int:
        return int(self.metadata["grid"])

    @property
    def images(self) -> ImageSet:
        """The full image list the cache was built from (skipped images included)."""
        listing = self.metadata["images"]
        return ImageSet(Path(listing["root"]), tuple(listing["paths"]), tuple(listing["labels"]))

    def image_of_row(self, rows: np.ndarray | int | None = None) -> np.ndarray:
        """Index in :attr:`images` of the image of each row (all rows when ``rows`` is None)."""
        rows = np.arange(self.n_tokens) if rows is None else np.asarray(rows)
        return self.kept_images[rows // self.tokens_per_image]

    def position_of_row(self, rows: np.ndarray | int | None = None) -> np.ndarray:
        """Grid position (row-major, 0..grid*grid-1) of each row."""
        rows = np.arange(self.n_tokens) if rows is None else np.asarray(rows)
        return self.positions[rows // self.tokens_per_image, rows % self.tokens_per_image]


def _check_device(device: Any) -> None:
    """Refuse an unknown device, or a GPU that is not there, before any work starts."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"device {device!r} is not a torch device; use 'cpu' or "
                         "'cuda[:N]'.") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is visible; use "
                         "'cpu'.")


def _read_json(path: Path) -> dict:
    """A JSON object from a file of ours, or a :class:`CorruptCacheError` that says so."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # invalid JSON or not UTF-8 text (e.g. a pickle put there)
        raise CorruptCacheError(f"{path} is not valid JSON ({error}): the file is damaged; "
                                f"{_REBUILD}.") from error
    if not isinstance(value, dict):
        raise CorruptCacheError(f"{path} holds a JSON {type(value).__name__}, not an object: "
                                f"the file is damaged; {_REBUILD}.")
    return value


def _json_normal(value: Any) -> Any:
    """What ``value`` reads back as from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


class CorruptCacheError(ValueError):
    """A cache whose files are damaged, truncated or altered since it was built."""


_REBUILD = ("rebuild it with build_cache(..., rebuild=True) (or make_synthetic_cache), or "
            "restore the folder from a copy")


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a storage failure (no space, no permission, read-only disk) into an OSError that
    names the file and says what to do; an interrupted build resumes."""
    try:
        yield
    except OSError as error:
        if str(path) in str(error):  # already says which file (usae_io.atomic_write does)
            raise
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}; choose a "
                      "writable folder with free space (an interrupted build resumes where "
                      "it stopped).") from error


def _partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _reserve(path: Path, start: int, length: int) -> None:
    """Allocate the disk blocks of bytes ``start .. start + length`` of ``path``.

    The arrays are sparse files written through memory maps: on a full disk such a write kills
    the process with SIGBUS, no message. Allocating first turns that into ENOSPC here.
    """
    if length <= 0 or not hasattr(os, "posix_fallocate"):
        return
    with _writing(path):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, start, length)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # unsupported: skip
                raise
        finally:
            os.close(fd)


def _write_json(path: Path, value: Any) -> None:
    usae_io.atomic_write(path, (_to_json(value) + "\n").encode("utf-8"))


def _to_json(value: Any, indent: int = 0) -> str:
    """JSON with one key per line, but a list of plain values on one line (image lists)."""
    pad, end = " " * (indent + 1), "\n" + " " * indent
    if isinstance(value, dict) and value:
        items = (f"{pad}{json.dumps(k)}: {_to_json(v, indent + 1)}" for k, v in value.items())
        return "{\n" + ",\n".join(items) + end + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(pad + _to_json(v, indent + 1) for v in value) + end + "]"
    return json.dumps(value, ensure_ascii=False)


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    usae_io.atomic_write(path, buffer.getvalue())


def _array_files(names: Sequence[str]) -> dict[str, str]:
    files = {name: (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model") + ".npy"
             for name in names}
    reserved = {METADATA_FILE, PROGRESS_FILE, KEPT_FILE, POSITIONS_FILE}
    if len(set(files.values())) < len(files) or reserved & set(files.values()):
        files = {name: f"model{i}.npy" for i, name in enumerate(names)}
    return files


def _request(models: list[dict], images: ImageSet, grid: int, tokens: int, seed: int,
             stats_sample: int) -> dict:
    """Everything that decides the cache's content; an existing cache must match it exactly."""
    return _json_normal({
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


def _request_of(metadata: dict) -> dict:
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


def _check_request(found: dict | None, wanted: dict, folder: Path, what: str) -> None:
    if found == wanted:
        return
    diff = _differences(found or {}, wanted) or ["unreadable metadata"]
    raise CacheMismatchError(
        f"{what} in {folder} was made with other settings:\n  - " + "\n  - ".join(diff) +
        "\nPass rebuild=True to replace it, or choose another out_dir.")


def _remove_cache(folder: Path) -> None:
    """Delete the files of a cache (only those it lists: the folder may hold other things)."""
    names = {METADATA_FILE, PROGRESS_FILE, KEPT_FILE, POSITIONS_FILE}
    for meta_name in (METADATA_FILE, PROGRESS_FILE):
        try:
            meta = json.loads((folder / meta_name).read_text(encoding="utf-8"))
            names.update(meta.get("files", {}).values())
        except (OSError, ValueError, AttributeError):
            pass
    for name in names:
        (folder / Path(name).name).unlink(missing_ok=True)
        _partial(folder / Path(name).name).unlink(missing_ok=True)
    _remove_temporaries(folder, names)


def _remove_temporaries(folder: Path, names: Iterable[str]) -> None:
    """Delete what atomic writes of these files left behind when the process was killed
    (``.<name>.*.tmp``; a SIGKILL gives them no chance to clean up)."""
    for name in names:
        for leftover in folder.glob(f".{glob.escape(Path(name).name)}.*.tmp"):
            leftover.unlink(missing_ok=True)


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
            if len(header.getvalue()) != offset:
                raise RuntimeError(f"cannot shrink {path} in place (header size changed).")
            handle.seek(0)
            handle.write(header.getvalue())
        # Always: a build killed between the two writes left the new header on the old length.
        handle.truncate(offset + rows * int(np.prod(shape[1:])) * dtype.itemsize)
        handle.flush()
        os.fsync(handle.fileno())


def _scalar_stats(array: np.ndarray, blocks: Sequence[int], tokens: int) -> tuple[float, float]:
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


def channel_means(cache: Cache) -> dict[str, np.ndarray]:
    """Per-channel mean (float64) of every model's tokens over the standardisation sample.

    The same seeded sample of images as the scalar statistics, read from the arrays, so that
    per-channel centring (``USAE.set_standardization(..., channel_means)``) needs nothing more
    from the build.
    """
    sample = np.asarray(cache.metadata["standardization"]["sample_images"])
    blocks = np.searchsorted(cache.kept_images, sample)  # image index -> row block
    assert (cache.kept_images[blocks] == sample).all()
    tokens = cache.tokens_per_image
    means = {}
    for name, array in cache.arrays.items():
        total = np.zeros(array.shape[1], dtype=np.float64)
        for i in range(0, len(blocks), 64):
            rows = (blocks[i:i + 64, None] * tokens + np.arange(tokens)).ravel()
            total += np.asarray(array[rows], dtype=np.float64).sum(axis=0)
        means[name] = total / (len(blocks) * tokens)
    return means


def _block_hashes(path: Path, block: int, indices: Iterable[int] | None = None) -> list[str]:
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


def _metadata_digest(metadata: dict) -> str:
    """sha256 of the metadata without this digest itself, in a canonical JSON form."""
    body = json.loads(json.dumps(metadata))
    body.get("checksums", {}).pop("metadata_sha256", None)
    return usae_io.sha256_json(body)


def _finalize(folder: Path, request: dict, models: list[dict], images: ImageSet, grid: int,
              tokens: int, seed: int, stats_sample: int, skipped: list[dict],
              build: dict, rows_done: int | None = None, *, hash_content: bool = True) -> dict:
    """Shrink the arrays, write the index files and statistics, hash everything, give the
    arrays their final names, then write ``cache.json``.

    The arrays arrive as ``<file>.partial``. ``hash_content=False`` records sizes only.
    """
    files = _array_files([m["name"] for m in models])
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
        with _writing(_partial(folder / name)):
            _shrink_npy(_partial(folder / name), n_tokens)
    _save_npy(folder / KEPT_FILE, kept)
    index_files = {"kept_images": KEPT_FILE}
    if tokens < grid * grid:
        _save_npy(folder / POSITIONS_FILE,
                  np.stack([_token_positions(seed, int(i), grid * grid, tokens) for i in kept]))
        index_files["positions"] = POSITIONS_FILE

    # Statistics over whole images, as the released code: a seeded sample of kept images.
    n_sample = min(stats_sample, kept.size)
    sample = np.sort(np.random.default_rng([seed, _STATS_STREAM]).choice(
        kept.size, size=n_sample, replace=False))
    for model in models:
        array = np.load(_partial(folder / files[model["name"]]), mmap_mode="r")
        model["mean"], model["std"] = _scalar_stats(array, sample, tokens)
        del array

    metadata = {
        "format": CACHE_FORMAT,
        "complete": True,
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
    if _request_of(metadata) != request:
        raise RuntimeError("internal error: the metadata does not record the request.")
    on_disk = {name: _partial(folder / name) if name in files.values() else folder / name
               for name in metadata["files"].values()}
    metadata["checksums"] = {
        "algorithm": "sha256", "block_bytes": CHECKSUM_BLOCK,
        "files": {name: {"bytes": path.stat().st_size,
                         **({"blocks": _block_hashes(path, CHECKSUM_BLOCK)} if hash_content
                            else {})}
                  for name, path in on_disk.items()}}
    metadata["checksums"]["metadata_sha256"] = _metadata_digest(metadata)
    for name in files.values():
        with _writing(folder / name):
            os.replace(_partial(folder / name), folder / name)
    usae_io.fsync_dir(folder)
    _write_json(folder / METADATA_FILE, metadata)
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    return metadata


def _load_for_models(path: Path, backbones: list) -> tuple[list[torch.Tensor] | None, str | None]:
    """Decode once, preprocess for every model; any failure skips the image for all of them."""
    opened = open_image(path)
    if opened.image is None:
        return None, opened.reason
    try:
        return [bb.preprocess(opened.image) for bb in backbones], None
    except Exception as error:
        return None, f"preprocessing failed ({type(error).__name__}: {error})"


def build_cache(backbones: Sequence[Any], images: ImageSet | str | os.PathLike,
                out_dir: str | os.PathLike, *, batch_size: int = 16,
                tokens_per_image: int | None = None, seed: int = 0, stats_sample: int = 1000,
                rebuild: bool = False, device: str | torch.device = "cpu", progress: bool = True,
                workers: int = 4) -> Cache:
    """Run every backbone over every image and store the token activations (see module doc).

    Parameters
    ----------
    backbones : sequence of Backbone
        Distinct names, one common grid. Moved to ``device`` and put in eval mode.
    images : ImageSet or path
        A path is listed with :func:`list_images`.
    out_dir : path
        The cache folder. A complete cache with the same settings is opened and returned as is;
        an incomplete one with the same settings is resumed where it stopped.
    batch_size : int
        Images per forward pass, and the unit of work saved to disk.
    tokens_per_image : int, optional
        Keep this many grid positions per image (a seeded draw, the same positions for every
        model) instead of all ``grid*grid``, to fit a disk budget
        (:func:`tokens_per_image_for_budget`).
    seed : int
        Seeds the kept positions and the images sampled for the statistics.
    stats_sample : int
        Images sampled for the standardisation statistics (all if fewer are kept).
    rebuild : bool
        Delete an existing cache in ``out_dir`` (complete or not) and build anew.
    device : str or torch.device
        Where the backbones run, in fp32 as the released code.
    progress : bool
        Show a progress bar (images/s).
    workers : int
        Threads that decode and preprocess images while the backbones run.

    Returns
    -------
    Cache

    Raises
    ------
    CacheMismatchError
        ``out_dir`` holds a cache made with other models, images, tokens or seed.
    ValueError
        Bad arguments, a backbone that returns the wrong shape, or no usable image at all.

    Notes
    -----
    Unreadable images are skipped for every model (rows exist only for images all models
    saw) and listed with their reason in the metadata. The arrays are pre-allocated memmaps
    named ``<model>.npy.partial``; the disk blocks of each batch are allocated before it is
    written (a full disk is an ``OSError`` naming the file, not a crash), then the arrays are
    flushed and ``progress.json`` is replaced atomically, so an interrupted build (a crash,
    SIGKILL, a full disk) resumes at the last finished batch. At the end every file is hashed
    (one read of the whole cache, at disk speed), the arrays get their final names and
    ``cache.json`` is written last. Resumed with the same batch size and device, the result is
    byte-identical to an uninterrupted build (the metadata holds no timestamps).
    """
    backbones = list(backbones)
    if not backbones:
        raise ValueError("build_cache needs at least one backbone.")
    names = [bb.name for bb in backbones]
    if len(set(names)) != len(names):
        raise ValueError(f"backbone names must be distinct, got {names}.")
    grids = {bb.name: int(bb.grid) for bb in backbones}
    if len(set(grids.values())) != 1:
        raise ValueError(f"all backbones must share one token grid to align tokens, got {grids}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(stats_sample, bool) or not isinstance(stats_sample, int) or stats_sample < 1:
        raise ValueError(f"stats_sample must be a positive integer, got {stats_sample!r}.")
    grid = next(iter(grids.values()))
    grid_tokens = grid * grid
    tokens = grid_tokens if tokens_per_image is None else tokens_per_image
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= grid_tokens:
        raise ValueError(f"tokens_per_image must be within 1..{grid_tokens}, got "
                         f"{tokens_per_image!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    _check_device(device)
    if not isinstance(images, ImageSet):
        images = list_images(images)
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out_dir {folder} exists and is not a folder; pass a folder for the "
                         "cache.")
    with _writing(folder):
        folder.mkdir(parents=True, exist_ok=True)

    models = []
    for bb in backbones:
        described = bb.describe()
        preprocessing = (dataclasses.asdict(bb.preprocessing)
                         if dataclasses.is_dataclass(getattr(bb, "preprocessing", None))
                         else described.get("preprocessing"))
        models.append(_json_normal({"name": bb.name, "width": int(bb.width),
                                    "layer": described.get("layer"), "grid": grid,
                                    "preprocessing": preprocessing, "describe": described}))
    request = _request(models, images, grid, tokens, seed, stats_sample)
    files = _array_files(names)

    if rebuild:
        _remove_cache(folder)
    if (folder / METADATA_FILE).exists():
        found = _read_json(folder / METADATA_FILE)
        _check_request(_request_of(found), request, folder, "the cache")
        (folder / PROGRESS_FILE).unlink(missing_ok=True)
        return open_cache(folder)

    n = len(images)
    state = None
    paths = {bb.name: _partial(folder / files[bb.name]) for bb in backbones}
    _remove_temporaries(folder, [METADATA_FILE, PROGRESS_FILE, KEPT_FILE, POSITIONS_FILE,
                                 *files.values()])
    if (folder / PROGRESS_FILE).exists():
        state = _read_json(folder / PROGRESS_FILE)
        _check_request(state.get("request"), request, folder, "an unfinished cache")
        if not {"images_done", "rows_done", "skipped"} <= set(state):
            raise CorruptCacheError(f"{folder / PROGRESS_FILE} lacks the build's progress; "
                                    "pass rebuild=True.")
    if state is None:
        needed = n * cache_bytes_per_image([bb.width for bb in backbones], tokens)
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise ValueError(
                f"the cache needs {needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB "
                "free; keep fewer tokens per image (tokens_per_image_for_budget) or fewer images.")
        arrays = {}
        try:
            for bb in backbones:
                with _writing(paths[bb.name]):
                    arrays[bb.name] = np.lib.format.open_memmap(
                        paths[bb.name], mode="w+", dtype=DTYPE, shape=(n * tokens, bb.width))
            state = {"format": CACHE_FORMAT, "request": request, "files": files,
                     "images_done": 0, "rows_done": 0, "skipped": []}
            _write_json(folder / PROGRESS_FILE, state)
        except BaseException:  # nothing done yet: leave nothing behind
            arrays.clear()
            for path in [*paths.values(), folder / PROGRESS_FILE]:
                path.unlink(missing_ok=True)
            raise
    else:
        for name in files.values():  # a build killed while finalizing had renamed some
            if not _partial(folder / name).exists() and (folder / name).exists():
                with _writing(folder / name):
                    os.replace(folder / name, _partial(folder / name))
        arrays = {}
        for bb in backbones:
            try:
                arrays[bb.name] = np.load(paths[bb.name], mmap_mode="r+")
            except (OSError, ValueError) as error:
                raise CorruptCacheError(f"the unfinished cache in {folder} lacks a readable "
                                        f"{paths[bb.name].name} ({error}); pass "
                                        "rebuild=True.") from error
            if state["images_done"] < n and arrays[bb.name].shape != (n * tokens, bb.width):
                raise ValueError(f"{files[bb.name]} in {folder} has shape "
                                 f"{arrays[bb.name].shape}, expected {(n * tokens, bb.width)}; "
                                 "pass rebuild=True.")

    for bb in backbones:
        bb.to(device).eval()
    starts = list(range(state["images_done"], n, batch_size))
    bar = tqdm(total=n, initial=state["images_done"], unit="img", desc="caching",
               disable=not progress, smoothing=0.1)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    try:
        def submit(start: int) -> list:
            return [pool.submit(_load_for_models, images.absolute(i), backbones)
                    for i in range(start, min(start + batch_size, n))]

        pending = submit(starts[0]) if starts else []
        for k, start in enumerate(starts):
            loaded = [future.result() for future in pending]
            # Decode the next batch while the backbones work on this one.
            pending = submit(starts[k + 1]) if k + 1 < len(starts) else []
            good = []
            for offset, (pixels, reason) in enumerate(loaded):
                if pixels is None:
                    state["skipped"].append({"index": start + offset,
                                             "path": images.paths[start + offset],
                                             "reason": reason})
                else:
                    good.append((start + offset, pixels))
            blocks, failed = _extract(backbones, good, tokens, seed, device)
            state["skipped"] += [{"index": i, "path": images.paths[i], "reason": reason}
                                 for i, reason in failed]
            rows = state["rows_done"]
            for name, block in blocks.items():
                _reserve(paths[name], arrays[name].offset + rows * block[0].nbytes, block.nbytes)
                arrays[name][rows:rows + len(block)] = block
            for name, array in arrays.items():
                with _writing(paths[name]):
                    array.flush()  # data on disk before the progress file says it is
            state["rows_done"] = rows + (len(next(iter(blocks.values()))) if blocks else 0)
            state["images_done"] = min(start + batch_size, n)
            _write_json(folder / PROGRESS_FILE, state)
            bar.update(state["images_done"] - start)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    del arrays

    build = {"batch_size": batch_size, "device": str(device), "torch": torch.__version__,
             "numpy": np.__version__}
    _finalize(folder, request, models, images, grid, tokens, seed, stats_sample,
              state["skipped"], build, state["rows_done"])
    return open_cache(folder)


def _extract(backbones: list, good: list[tuple[int, list[torch.Tensor]]], tokens: int,
             seed: int, device: Any) -> tuple[dict[str, np.ndarray], list[tuple[int, str]]]:
    """Forward a batch of (image index, pixels per model) through every model.

    Returns name -> (kept images * tokens, width) float16 rows, and (image index, reason) for
    images dropped because some model's activations are not finite in float16 (NaN, or beyond
    65504): dropping them for every model keeps the rows aligned.
    """
    if not good:
        return {}, []
    grid_tokens = backbones[0].grid ** 2
    outputs = {}
    with torch.inference_mode():
        for m, bb in enumerate(backbones):
            pixels = torch.stack([p[m] for _, p in good]).to(device)
            out = bb(pixels)
            if tuple(out.shape) != (len(good), grid_tokens, bb.width):
                raise ValueError(f"backbone {bb.name!r} returned shape {tuple(out.shape)}, "
                                 f"expected {(len(good), grid_tokens, bb.width)} "
                                 "(images, grid*grid tokens, width).")
            outputs[bb.name] = out.to(torch.float16)
    finite = torch.stack([torch.isfinite(o).flatten(1).all(1) for o in outputs.values()]).all(0)
    finite = finite.cpu().tolist()
    failed = [(index, "activations not finite in float16 (NaN or beyond +-65504) for some "
                      "model") for ok, (index, _) in zip(finite, good) if not ok]
    keep = [i for i, ok in enumerate(finite) if ok]
    if not keep:
        return {}, failed
    if tokens < grid_tokens:
        chosen = torch.from_numpy(np.stack(
            [_token_positions(seed, good[i][0], grid_tokens, tokens) for i in keep])).long()
    blocks = {}
    for name, out in outputs.items():
        out = out[keep]
        if tokens < grid_tokens:
            out = torch.gather(out, 1, chosen.to(out.device)[:, :, None].expand(-1, -1,
                                                                                out.shape[2]))
        blocks[name] = out.reshape(-1, out.shape[2]).cpu().numpy()
    return blocks, failed


def open_cache(path: str | os.PathLike, verify: str = "auto", *,
               seed: int | None = None) -> Cache:
    """Open a complete cache read-only, after checking that it is the one that was built.

    Always checked (cheap): the metadata is valid JSON with every key, unaltered (its own
    sha256); every file has the recorded size; the arrays have the recorded dtype and shape.

    Parameters
    ----------
    path : path
        The cache folder (or its ``cache.json``).
    verify : {"auto", "full", "size"}
        How much content to hash against the sha256 of every 16 MiB block recorded at build
        time. ``"full"``: every block (reads the whole cache once, at disk speed). ``"auto"``
        (default): every block when the files total at most :data:`AUTO_FULL_BYTES` (2 GiB);
        above that, the first, the last and randomly drawn blocks of each file,
        :data:`SAMPLE_BLOCKS` (8) per file, so that an ImageNet-sized cache opens in seconds;
        truncation and damaged ends are always caught, a damaged block elsewhere with a
        probability that grows with each open. ``"size"``: no hashing.
    seed : int, optional
        Seeds the sampled blocks of ``"auto"``; ``None`` draws new blocks at each open.

    Raises
    ------
    FileNotFoundError
        No cache there, or an unfinished one (the message says how to resume it).
    CorruptCacheError
        A file is damaged, truncated or altered (the message names it and says what to do).
    ValueError
        Bad ``verify``, or ``"full"`` asked of a cache that holds no content checksums.

    Notes
    -----
    Caches built before checksums existed, and synthetic caches (which record sizes only:
    tests edit them in place and they are regenerated from a seed in seconds), are checked for
    sizes and shapes only.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r} is not one of {list(VERIFY_MODES)}.")
    folder = Path(path)
    if folder.name == METADATA_FILE:
        folder = folder.parent
    meta_path = folder / METADATA_FILE
    if not meta_path.exists():
        if (folder / PROGRESS_FILE).exists():
            state = _read_json(folder / PROGRESS_FILE)
            raise FileNotFoundError(
                f"the cache in {folder} is unfinished ({state.get('images_done')} of "
                f"{state.get('request', {}).get('n_images')} images done); run build_cache "
                "again with the same arguments to resume it.")
        raise FileNotFoundError(f"no activation cache in {folder} (no {METADATA_FILE}); build "
                                "one with build_cache.")
    metadata = _read_json(meta_path)
    if metadata.get("format") != CACHE_FORMAT or metadata.get("complete") is not True:
        raise CorruptCacheError(f"{meta_path} is not a complete {CACHE_FORMAT} cache; "
                                f"{_REBUILD}.")
    _check_metadata(metadata, meta_path)
    checksums = metadata.get("checksums")
    if checksums is not None:
        _check_sizes(folder, metadata)
    elif verify == "full":
        raise ValueError(f"the cache in {folder} holds no checksums (built by an older version); "
                         "open it with verify='size', or rebuild it to add them.")

    arrays, stats = {}, {}
    for model in metadata["models"]:
        array = _load_npy(folder / model["file"], mmap_mode="r")
        expected = (metadata["n_tokens"], model["width"])
        if array.shape != expected or array.dtype != DTYPE:
            raise CorruptCacheError(f"{folder / model['file']} holds {array.dtype} {array.shape}, "
                                    f"the metadata says float16 {expected}; {_REBUILD}.")
        arrays[model["name"]] = array
        stats[model["name"]] = (float(model["mean"]), float(model["std"]))
    kept = _load_npy(folder / metadata["files"]["kept_images"])
    tokens, grid_tokens = metadata["tokens_per_image"], metadata["grid"] ** 2
    if kept.shape != (metadata["n_images_kept"],) or kept.size * tokens != metadata["n_tokens"]:
        raise CorruptCacheError(f"{folder / metadata['files']['kept_images']} holds "
                                f"{kept.shape} image indices, the metadata says "
                                f"{metadata['n_images_kept']} images of {tokens} tokens = "
                                f"{metadata['n_tokens']} rows; {_REBUILD}.")
    if "positions" in metadata["files"]:
        positions = _load_npy(folder / metadata["files"]["positions"])
        if positions.shape != (kept.size, tokens):
            raise CorruptCacheError(f"{folder / metadata['files']['positions']} has shape "
                                    f"{positions.shape}, expected {(kept.size, tokens)}; "
                                    f"{_REBUILD}.")
    else:
        positions = np.broadcast_to(np.arange(grid_tokens, dtype=np.int16),
                                    (kept.size, grid_tokens))
    if checksums is not None and verify != "size":
        _check_content(folder, checksums, verify, seed)
    return Cache(folder, metadata, arrays, stats, kept, positions)


_NUMBER = (int, float)
_REQUIRED = {"n_tokens": int, "grid": int, "tokens_per_image": int, "n_images_kept": int,
             "models": list, "files": dict, "images": dict}
_REQUIRED_MODEL = {"name": str, "width": int, "file": str, "mean": _NUMBER, "std": _NUMBER}


def _check_metadata(metadata: dict, path: Path) -> None:
    """Every key the cache is read with is there, with the right type."""
    def check(value: Any, key: str, kind: type | tuple, where: str = "") -> None:
        if isinstance(value, bool) or not isinstance(value, kind):
            raise CorruptCacheError(f"{path} has no valid {key!r}{where} (found {value!r:.60}): "
                                    f"the file is damaged or was edited; {_REBUILD}.")

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


def _check_sizes(folder: Path, metadata: dict) -> None:
    """Sizes of every file and the metadata's own checksum: cheap, always done."""
    checksums, meta_path = metadata["checksums"], folder / METADATA_FILE
    if not isinstance(checksums, dict) or checksums.get("metadata_sha256") != \
            _metadata_digest(metadata):
        raise CorruptCacheError(f"{meta_path} differs from what the build wrote (its checksum "
                                f"does not match): it was edited or damaged; {_REBUILD}.")
    try:  # one hash per block (if any), and no path that leaves the folder
        block = int(checksums["block_bytes"])
        for name, info in checksums["files"].items():
            count = max(1, -(-int(info["bytes"]) // block))
            if Path(name).name != name or len(info.get("blocks", [None] * count)) != count:
                raise ValueError(name)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as error:
        raise CorruptCacheError(f"{meta_path} holds malformed checksums ({error!r}); "
                                f"{_REBUILD}.") from error
    for name, info in checksums["files"].items():
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != info["bytes"]:
            found = "missing" if size is None else f"{size:,} bytes"
            raise CorruptCacheError(f"{path} is {found}, the build wrote {info['bytes']:,} "
                                    f"bytes: it was truncated, replaced or deleted; "
                                    f"{_REBUILD}.")


def _sample_blocks(count: int, rng: np.random.Generator) -> list[int]:
    """First and last block (headers, truncation) and a random draw of the others."""
    if count <= SAMPLE_BLOCKS:
        return list(range(count))
    middle = rng.choice(np.arange(1, count - 1), SAMPLE_BLOCKS - 2, replace=False)
    return [0, *sorted(int(i) for i in middle), count - 1]


def _check_content(folder: Path, checksums: dict, verify: str, seed: int | None) -> None:
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
        for index, digest in zip(chosen, _block_hashes(folder / name, block, chosen)):
            if digest != info["blocks"][index]:
                start = index * block
                raise CorruptCacheError(
                    f"{folder / name}: bytes {start:,}..{min(start + block, info['bytes']):,} "
                    f"differ from the checksum recorded when the cache was built: the file was "
                    f"altered or damaged; {_REBUILD}.")


def _load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` without pickles, or a :class:`CorruptCacheError` naming the file."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise CorruptCacheError(f"{path} is not a readable numpy array ({error}); "
                                f"{_REBUILD}.") from error


def make_synthetic_cache(out_dir: str | os.PathLike, widths: Mapping[str, int], n_images: int,
                         *, tokens_per_image: int | None = None, grid: int = 14, seed: int = 0,
                         stats_sample: int = 1000, rebuild: bool = False,
                         acts: Mapping[str, Any] | None = None) -> Cache:
    """A complete cache of synthetic fp16 activations, for benchmarks, tests and the
    ``synthetic`` preset.

    The activations are ``acts`` (model name -> ``n_images * tokens_per_image x width``
    array, e.g. planted concepts) or, by default, seeded N(0, 1) noise. The cache has the same
    layout and metadata as a real one (models described as synthetic), so :func:`open_cache`
    and :class:`TokenLoader` treat it the same; but its checksums record file sizes only (no
    content hashes): tests edit synthetic caches in place, and the seed regenerates them.
    """
    tokens = grid * grid if tokens_per_image is None else int(tokens_per_image)
    images = ImageSet(Path("synthetic"), tuple(f"{i:07d}.png" for i in range(n_images)),
                      ("synthetic",) * n_images)
    models = [_json_normal({"name": name, "width": int(width), "layer": None, "grid": grid,
                            "preprocessing": None,
                            "describe": {"name": name, "synthetic": True, "seed": seed}})
              for name, width in widths.items()]
    request = _request(models, images, grid, tokens, seed, stats_sample)
    folder = Path(out_dir)
    with _writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    if rebuild:
        _remove_cache(folder)
    if (folder / METADATA_FILE).exists():
        found = _read_json(folder / METADATA_FILE)
        _check_request(_request_of(found), request, folder, "the cache")
        return open_cache(folder)
    files = _array_files(list(widths))
    rng = np.random.default_rng(seed)
    for name, width in widths.items():
        with _writing(_partial(folder / files[name])):
            array = np.lib.format.open_memmap(_partial(folder / files[name]), mode="w+",
                                              dtype=DTYPE, shape=(n_images * tokens, width))
        if acts is not None:
            given = np.asarray(acts[name], dtype=np.float32)
            if given.shape != array.shape:
                raise ValueError(f"acts[{name!r}] has shape {given.shape}, expected "
                                 f"{array.shape} (n_images * tokens_per_image, width).")
            array[:] = given
        for start in range(0, len(array) if acts is None else 0, 65536):
            stop = min(start + 65536, len(array))
            array[start:stop] = rng.standard_normal((stop - start, width), dtype=np.float32)
        array.flush()
        del array
    _finalize(folder, request, models, images, grid, tokens, seed, stats_sample, [],
              {"synthetic": True}, hash_content=False)
    return open_cache(folder)


def iter_rows(cache: Cache, batch_size: int = 16384, *,
              device: str | torch.device = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive rows in cache order, as float32 tensors (the analyses' reading order:
    whole images stay together when ``batch_size`` is a multiple of the tokens per image)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    for start in range(0, cache.n_tokens, batch_size):
        stop = min(start + batch_size, cache.n_tokens)
        yield {name: torch.from_numpy(np.array(cache.arrays[name][start:stop]))
               .to(device, torch.float32) for name in cache.names}


# ----------------------------------------------------------------------------------------------
# Loader


class TokenLoader:
    """Endless shuffled batches of token-aligned activations, streamed from a :class:`Cache`.

    Each batch is a dict model name -> float32 tensor (batch_size x width) and row ``i`` of
    every tensor is the same (image, position). The stream is the concatenation of epochs;
    epoch ``e`` is a permutation of all rows drawn from ``(seed, e)``, so every row appears
    exactly once per ``n_tokens`` consecutive rows of the stream. Batches are consecutive
    slices of the stream: when ``batch_size`` does not divide ``n_tokens`` a batch straddles
    two epochs (no row is dropped, and every batch is full).

    Memory is bounded, whatever the cache size: an epoch permutes *chunks* of ``chunk_rows``
    contiguous rows, groups ``buffer_chunks`` consecutive chunks of that order into a buffer,
    reads the buffer (large sequential reads) and shuffles rows inside it. At most two buffers
    (the current one and the next, read ahead in a background thread) plus one batch are in
    memory: about ``2 * chunk_rows * buffer_chunks * sum(widths) * 2`` bytes (1 GB for the
    paper's models with the defaults).

    Randomness trade-off: rows in one batch come from one or two buffers, i.e. about
    ``chunk_rows * buffer_chunks / tokens_per_image`` images (about 670 images with the paper's
    196 tokens and the defaults) rather than from the whole cache, and tokens of one image tend
    to share batches. Larger buffers or smaller chunks give a closer-to-uniform shuffle at the
    cost of memory or of shorter reads.

    Parameters
    ----------
    cache : Cache or path
        A cache, or a folder for :func:`open_cache`.
    batch_size : int
        Tokens per batch, at least 2 (BatchNorm); 6,272 = 32 images x 196 tokens in the paper.
    seed : int
        Seeds every epoch's order.
    device : str or torch.device
        Where batches are put (cast from fp16 to fp32 there, so half the bytes move).
    standardize : bool
        Apply ``(x - mean) / (std + 1e-5)`` with the cache's statistics. Off by default: the
        USAE applies its own standardisation.
    chunk_rows, buffer_chunks : int
        The shuffle granularity and the buffer size, see above.
    prefetch : bool
        Read the next buffer in a background thread while the current one is served.
    """

    def __init__(self, cache: Cache | str | os.PathLike, batch_size: int = 6272, seed: int = 0,
                 device: str | torch.device = "cpu", standardize: bool = False, *,
                 chunk_rows: int = 4096, buffer_chunks: int = 32, prefetch: bool = True) -> None:
        for value, what, low in ((batch_size, "batch_size", 2), (chunk_rows, "chunk_rows", 1),
                                 (buffer_chunks, "buffer_chunks", 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{what} must be an integer >= {low}, got {value!r}"
                                 + (" (BatchNorm needs at least 2 tokens)."
                                    if what == "batch_size" else "."))
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
        _check_device(device)
        if not isinstance(cache, Cache):
            cache = open_cache(cache)
        self.cache = cache
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.standardize = standardize
        self.chunk_rows = chunk_rows
        self.buffer_chunks = buffer_chunks
        self.prefetch = prefetch
        self.n_rows = cache.n_tokens
        self.n_chunks = -(-self.n_rows // chunk_rows)
        self.rows_read = 0  # rows read from the cache (per model), for tests and benchmarks
        self.largest_read = 0  # most rows of one array read at once

    @property
    def names(self) -> list[str]:
        return self.cache.names

    @property
    def batches_per_epoch(self) -> float:
        return self.n_rows / self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iter_from(0)

    def _epoch_buffers(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The chunks of each buffer of an epoch (sorted, for sequential reads) and their ends."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
        buffers = [np.sort(order[i:i + self.buffer_chunks])
                   for i in range(0, self.n_chunks, self.buffer_chunks)]
        sizes = [sum(min(self.chunk_rows, self.n_rows - c * self.chunk_rows) for c in chunks)
                 for chunks in buffers]
        return buffers, np.cumsum(sizes)

    def _plan(self, epoch: int, offset: int) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """(epoch, buffer index, chunks, first row to serve) from stream position onwards."""
        while True:
            buffers, ends = self._epoch_buffers(epoch)
            first = int(np.searchsorted(ends, offset, side="right"))
            for b in range(first, len(buffers)):
                start = offset - (int(ends[b - 1]) if b else 0) if b == first else 0
                yield epoch, b, buffers[b], start
            epoch, offset = epoch + 1, 0

    def _read(self, epoch: int, index: int, chunks: np.ndarray) -> tuple[dict, np.ndarray]:
        """Read one buffer: chunk after chunk, into one array per model; and its row order."""
        spans = [(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n_rows))
                 for c in chunks.tolist()]
        total = sum(b - a for a, b in spans)
        data = {}
        for name, array in self.cache.arrays.items():
            buffer = np.empty((total, array.shape[1]), dtype=array.dtype)
            at = 0
            for a, b in spans:
                buffer[at:at + b - a] = array[a:b]  # a plain copy: numpy drops the GIL here
                at += b - a
            data[name] = buffer
        self.rows_read += total
        self.largest_read = max(self.largest_read, max(b - a for a, b in spans))
        order = np.random.default_rng([self.seed, epoch, index + 1]).permutation(total)
        return data, order

    def iter_from(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from global batch index ``step`` onwards, as a fresh iteration would give.

        Nothing before the buffer that holds the first requested row is read: resuming at step
        one million costs one buffer read (two with prefetching). The order depends on the
        cache, ``seed``, ``batch_size``, ``chunk_rows`` and ``buffer_chunks``, so a resumed run
        must use the same ones (not on ``prefetch`` or ``device``).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}.")
        epoch, offset = divmod(step * self.batch_size, self.n_rows)
        plan = self._plan(epoch, offset)
        pool = concurrent.futures.ThreadPoolExecutor(1) if self.prefetch else None
        try:
            spec = next(plan)
            pending = pool.submit(self._read, *spec[:3]) if pool else None
            parts: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
            need = self.batch_size
            while True:
                data, order = pending.result() if pool else self._read(*spec[:3])
                start = spec[3]
                spec = next(plan)
                if pool:  # read the next buffer while this one is served
                    pending = pool.submit(self._read, *spec[:3])
                while start < len(order):
                    take = order[start:start + need]
                    for name in self.names:
                        parts[name].append(data[name][take])
                    start += len(take)
                    need -= len(take)
                    if need == 0:
                        yield self._batch(parts)
                        parts = {name: [] for name in self.names}
                        need = self.batch_size
                del data, order
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _batch(self, parts: dict[str, list[np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = {}
        for name, pieces in parts.items():
            half = torch.from_numpy(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
            if self.device.type == "cuda":
                half = half.pin_memory().to(self.device, non_blocking=True)
            values = half.to(self.device, torch.float32)
            if self.standardize:
                mean, std = self.cache.standardization[name]
                values.sub_(mean).div_(std + STD_EPS)
            batch[name] = values
        return batch

