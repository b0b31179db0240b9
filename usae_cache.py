"""Images -> co-indexed activation cache on disk: building it and opening it.

A USAE trains on the final-layer tokens of several vision models, and row ``t`` of every
model's activations must be the same image and 14x14 grid position. :func:`build_cache` runs
every backbone over every image once and stores one fp16 ``.npy`` array per model, memory-mapped,
rows aligned across models by (image, token); the build resumes after an interruption and ends
byte-identical to an uninterrupted one. :func:`open_cache` opens a complete cache read-only, as
a :class:`Cache` of memory maps, after checking it (``usae_cache_verify``); ``usae_loader``
streams batches from it without loading it whole.

A cache is named by its request: everything that decides its content (models, image list,
grid, tokens per image, seeds), whose sha256 ``cache.json`` stores. ``build_cache`` reuses or
resumes a cache only for the same request hash and refuses any other
(``CacheMismatchError``, listing what differs) unless asked to rebuild.

On-disk layout of a cache folder::

    cache.json          metadata and checksums, written last and only once the cache is complete
    progress.json       during a build only: how many images are done (atomic writes)
    <model>.npy         (n_tokens, width) float16, one per model, same row order
                        (``<model>.npy.partial`` while the build runs: never a final name for
                        an unfinished file)
    kept_images.npy     (n_kept,) int32: index in the image list of each kept image
    positions.npy       (n_kept, T) int16: kept grid positions, only when T < grid*grid

Row ``r`` holds image ``kept_images[r // T]`` at grid position ``positions[r // T, r % T]``
(row-major on the grid). The standardisation statistics are one scalar mean and one scalar
unbiased std per model, over every cached token of a seeded sample of 1,000 images, as the
released code (spec section 2); the loader leaves the activations raw unless asked.

Of the project this module imports ``usae_cache_files`` (file names, the request that names a
cache, :class:`~usae_cache_files.CacheMismatchError`, the crash-safe writes of a build),
``usae_cache_verify`` (checksums, :class:`~usae_cache_verify.CorruptCacheError`),
``usae_cache_shards`` (the build shared by the ranks of a ``torchrun`` job),
``usae_checks`` (the argument checks: integers, seeds, devices) and ``usae_images`` (image lists,
decoding); backbones are used through their interface (``name``, ``width``, ``grid``,
``preprocessing``, ``preprocess``, ``forward``, ``describe``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import usae_cache_files as cache_files
import usae_cache_shards as shards
import usae_cache_verify as integrity
import usae_checks as checks
import usae_io
from usae_cache_files import (CACHE_FORMAT, DTYPE, LOCK_FILE, METADATA_FILE, PROGRESS_FILE,
                              cache_bytes_per_image)
from usae_cache_verify import CorruptCacheError
from usae_images import ImageSet, list_images, open_image


# ----------------------------------------------------------------------------------------------
# Sizes


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


# ----------------------------------------------------------------------------------------------
# The cache, opened


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
        (default): every block when the files total at most
        ``usae_cache_verify.AUTO_FULL_BYTES`` (2 GiB); above that, the first, the last and
        randomly drawn blocks of each file, ``SAMPLE_BLOCKS`` (8) per file, so that an
        ImageNet-sized cache opens in seconds; truncation and damaged ends are always caught,
        a damaged block elsewhere with a probability that grows with each open. ``"size"``: no
        hashing.
    seed : int, optional
        Seeds the sampled blocks of ``"auto"``; ``None`` draws new blocks at each open.

    Raises
    ------
    FileNotFoundError
        No cache there, or an unfinished one (the message says how to resume it).
    CorruptCacheError
        A file is damaged, truncated or altered (the message names it and says what to do).
    ValueError
        Bad ``verify`` or ``seed``, or ``"full"`` asked of a cache that holds no content
        checksums.

    Notes
    -----
    Caches built before checksums existed, and synthetic caches (which record sizes only:
    tests edit them in place and they are regenerated from a seed in seconds), are checked for
    sizes and shapes only.
    """
    if verify not in integrity.VERIFY_MODES:
        raise ValueError(f"verify={verify!r} is not one of {list(integrity.VERIFY_MODES)}.")
    if seed is not None:
        checks.require_seed(seed)
    folder = Path(path)
    if folder.name == METADATA_FILE:
        folder = folder.parent
    meta_path = folder / METADATA_FILE
    if not meta_path.exists():
        if (folder / PROGRESS_FILE).exists():
            state = integrity.read_json(folder / PROGRESS_FILE)
            raise FileNotFoundError(
                f"the cache in {folder} is unfinished ({state.get('images_done')} of "
                f"{state.get('request', {}).get('n_images')} images done); run build_cache "
                "again with the same arguments to resume it.")
        raise FileNotFoundError(f"no activation cache in {folder} (no {METADATA_FILE}); build "
                                "one with build_cache.")
    metadata = integrity.read_json(meta_path)
    if metadata.get("format") != CACHE_FORMAT or metadata.get("complete") is not True:
        raise CorruptCacheError(f"{meta_path} is not a complete {CACHE_FORMAT} cache; "
                                f"{integrity.REBUILD}.")
    integrity.check_metadata(metadata, meta_path)
    checksums = metadata.get("checksums")
    if checksums is not None:
        integrity.check_sizes(meta_path, metadata)
    elif verify == "full":
        raise ValueError(f"the cache in {folder} holds no checksums (built by an older version); "
                         "open it with verify='size', or rebuild it to add them.")

    def damaged(name: str, found: str, expected: str) -> CorruptCacheError:
        return CorruptCacheError(f"{folder / name} {found}, {expected}; {integrity.REBUILD}.")

    arrays, stats = {}, {}
    for model in metadata["models"]:
        array = integrity.load_npy(folder / model["file"], mmap_mode="r")
        expected = (metadata["n_tokens"], model["width"])
        if array.shape != expected or array.dtype != DTYPE:
            raise damaged(model["file"], f"holds {array.dtype} {array.shape}",
                          f"the metadata says float16 {expected}")
        arrays[model["name"]] = array
        stats[model["name"]] = (float(model["mean"]), float(model["std"]))
    files, tokens = metadata["files"], metadata["tokens_per_image"]
    kept = integrity.load_npy(folder / files["kept_images"])
    if kept.shape != (metadata["n_images_kept"],) or kept.size * tokens != metadata["n_tokens"]:
        raise damaged(files["kept_images"], f"holds {kept.shape} image indices",
                      f"the metadata says {metadata['n_images_kept']} images of {tokens} "
                      f"tokens = {metadata['n_tokens']} rows")
    if "positions" in files:
        positions = integrity.load_npy(folder / files["positions"])
        if positions.shape != (kept.size, tokens):
            raise damaged(files["positions"], f"has shape {positions.shape}",
                          f"expected {(kept.size, tokens)}")
    else:
        grid_tokens = metadata["grid"] ** 2
        positions = np.broadcast_to(np.arange(grid_tokens, dtype=np.int16),
                                    (kept.size, grid_tokens))
    if checksums is not None and verify != "size":
        integrity.check_content(folder, checksums, verify, seed)
    return Cache(folder, metadata, arrays, stats, kept, positions)


def _reuse(folder: Path, request: dict, rebuild: bool) -> Cache | None:
    """The complete cache in ``folder`` if it was made for ``request``; None if there is none,
    or if ``rebuild`` asked to delete the cache there (complete or not) first."""
    if rebuild:
        cache_files.remove_cache(folder)
        shards.remove_shards(folder)
    if not (folder / METADATA_FILE).exists():
        return None
    cache_files.check_request(integrity.read_json(folder / METADATA_FILE), request, folder)
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    return open_cache(folder)


# ----------------------------------------------------------------------------------------------
# Building


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
    usae_cache_files.CacheMismatchError
        ``out_dir`` holds a cache made for another request (other models, images, tokens or
        seed): its request hash differs. The message lists what differs.
    usae_cache_verify.CorruptCacheError
        ``out_dir`` holds a cache whose ``cache.json`` or ``progress.json`` is damaged.
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

    Called on every rank of an initialised ``torch.distributed`` process group of two or more
    processes (``torchrun``), with the same arguments (``device`` aside: each rank's own), the
    ranks build the cache together and every rank returns it (called on one rank alone, it
    waits for the others): each extracts a contiguous
    range of whole batches into its own shard, resumable on its own, and rank 0 assembles
    them in image order and finalizes once (``usae_cache_shards``). The files are
    byte-identical to a one-process build with the same batch size; ``cache.json``'s
    ``build`` record names rank 0's device.
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
    if not checks.is_int(batch_size, 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not checks.is_int(stats_sample, 1):
        raise ValueError(f"stats_sample must be a positive integer, got {stats_sample!r}.")
    grid = next(iter(grids.values()))
    tokens = grid * grid if tokens_per_image is None else tokens_per_image
    if not checks.is_int(tokens, 1) or tokens > grid * grid:
        raise ValueError(f"tokens_per_image must be within 1..{grid * grid}, got "
                         f"{tokens_per_image!r}.")
    checks.require_seed(seed)
    if not checks.is_int(workers, 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    checks.require_device(device)
    if not isinstance(images, ImageSet):
        images = list_images(images)
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out_dir {folder} exists and is not a folder; pass a folder for the "
                         "cache.")
    with cache_files.writing(folder):
        folder.mkdir(parents=True, exist_ok=True)

    models = []
    for bb in backbones:
        described = bb.describe()
        preprocessing = (dataclasses.asdict(bb.preprocessing)
                         if dataclasses.is_dataclass(getattr(bb, "preprocessing", None))
                         else described.get("preprocessing"))
        models.append(cache_files.json_normal({
            "name": bb.name, "width": int(bb.width), "layer": described.get("layer"),
            "grid": grid, "preprocessing": preprocessing, "describe": described}))
    request = cache_files.request_for(models, images, grid, tokens, seed, stats_sample)
    extraction = {"batch_size": batch_size, "tokens": tokens, "seed": seed, "device": device,
                  "progress": progress, "workers": workers}
    build = {"batch_size": batch_size, "device": str(device), "torch": torch.__version__,
             "numpy": np.__version__}

    def finish(state: dict) -> None:
        cache_files.finalize(folder, request, models, images, grid, tokens, seed, stats_sample,
                             state["skipped"], build, state["rows_done"])

    if shards.process_group() is not None:  # every rank of a torchrun job: build it together
        return shards.build_sharded(
            folder, request, batch_size, reuse=lambda: _reuse(folder, request, rebuild),
            extract=lambda shard, state, arrays, first, stop: _extract_images(
                backbones, images, shard, state, arrays, first, stop, **extraction),
            finish=finish, open_cache=open_cache)
    with usae_io.exclusive(folder / LOCK_FILE, "building an activation cache"):
        cache = _reuse(folder, request, rebuild)
        if cache is not None:
            return cache

        state, arrays = cache_files.open_partial(folder, request)
        _extract_images(backbones, images, folder, state, arrays, 0, len(images), **extraction)
        del arrays
        finish(state)
        shards.remove_shards(folder)  # left by a sharded build that one process finished
        return open_cache(folder)


def _extract_images(backbones: list, images: ImageSet, folder: Path, state: dict,
                    arrays: dict[str, np.ndarray], first: int, stop: int, *, batch_size: int,
                    tokens: int, seed: int, device: Any, progress: bool, workers: int) -> None:
    """Extract images ``first + state["images_done"]`` .. ``stop - 1`` of ``images`` in batches
    of ``batch_size`` into the build in ``folder`` (a cache, or a rank's shard whose image 0 is
    image ``first``), saving each batch (:func:`usae_cache_files.save_batch`)."""
    for bb in backbones:
        bb.to(device).eval()
    starts = list(range(first + state["images_done"], stop, batch_size))
    bar = tqdm(total=stop - first, initial=state["images_done"], unit="img", desc="caching",
               disable=not progress, smoothing=0.1)
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        def submit(start: int) -> list:
            return [pool.submit(load_for_models, images.absolute(i), backbones)
                    for i in range(start, min(start + batch_size, stop))]

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
            blocks, failed = extract_batch(backbones, good, tokens, seed, device)
            state["skipped"] += [{"index": i, "path": images.paths[i], "reason": reason}
                                 for i, reason in failed]
            cache_files.save_batch(folder, state, arrays, blocks,
                                   min(start + batch_size, stop) - first)
            bar.update(state["images_done"] + first - start)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def load_for_models(path: Path, backbones: list) -> tuple[list[torch.Tensor] | None, str | None]:
    """Decode once, preprocess for every model; any failure skips the image for all of them."""
    opened = open_image(path)
    if opened.image is None:
        return None, opened.reason
    try:
        return [bb.preprocess(opened.image) for bb in backbones], None
    except Exception as error:
        return None, f"preprocessing failed ({type(error).__name__}: {error})"


def extract_batch(backbones: list, good: list[tuple[int, list[torch.Tensor]]], tokens: int,
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
        chosen = torch.from_numpy(np.stack([cache_files.token_positions(
            seed, good[i][0], grid_tokens, tokens) for i in keep])).long()
    blocks = {}
    for name, out in outputs.items():
        out = out[keep]
        if tokens < grid_tokens:
            out = torch.gather(out, 1, chosen.to(out.device)[:, :, None].expand(-1, -1,
                                                                                out.shape[2]))
        blocks[name] = out.reshape(-1, out.shape[2]).cpu().numpy()
    return blocks, failed


def make_synthetic_cache(out_dir: str | os.PathLike, widths: Mapping[str, int], n_images: int,
                         *, tokens_per_image: int | None = None, grid: int = 14, seed: int = 0,
                         stats_sample: int = 1000, rebuild: bool = False,
                         acts: Mapping[str, Any] | None = None) -> Cache:
    """A complete cache of synthetic fp16 activations, for benchmarks, tests and the
    ``synthetic`` preset.

    The activations are ``acts`` (model name -> ``n_images * tokens_per_image x width``
    array, e.g. planted concepts) or, by default, seeded N(0, 1) noise. The cache has the same
    layout and metadata as a real one (models described as synthetic), so :func:`open_cache`
    and ``usae_loader.TokenLoader`` treat it the same; but its checksums record file sizes only
    (no content hashes): tests edit synthetic caches in place, and the seed regenerates them.
    """
    tokens = grid * grid if tokens_per_image is None else int(tokens_per_image)
    for name, width in widths.items():
        if acts is not None and tuple(np.shape(acts[name])) != (n_images * tokens, width):
            raise ValueError(f"acts[{name!r}] has shape {tuple(np.shape(acts[name]))}, expected "
                             f"{(n_images * tokens, width)} (n_images * tokens_per_image, width).")
    images = ImageSet(Path("synthetic"), tuple(f"{i:07d}.png" for i in range(n_images)),
                      ("synthetic",) * n_images)
    models = [cache_files.json_normal({
        "name": name, "width": int(width), "layer": None, "grid": grid, "preprocessing": None,
        "describe": {"name": name, "synthetic": True, "seed": seed}})
        for name, width in widths.items()]
    request = cache_files.request_for(models, images, grid, tokens, seed, stats_sample)
    folder = Path(out_dir)
    with cache_files.writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    with usae_io.exclusive(folder / LOCK_FILE, "writing a synthetic activation cache"):
        cache = _reuse(folder, request, rebuild)
        if cache is not None:
            return cache
        _, arrays = cache_files.open_partial(folder, request)
        rng = np.random.default_rng(seed)
        for name, array in arrays.items():
            if acts is not None:
                array[:] = np.asarray(acts[name], dtype=np.float32)
            else:
                for start in range(0, len(array), 65536):
                    stop = min(start + 65536, len(array))
                    array[start:stop] = rng.standard_normal((stop - start, array.shape[1]),
                                                            dtype=np.float32)
            array.flush()
        del arrays
        cache_files.finalize(folder, request, models, images, grid, tokens, seed, stats_sample, [],
                             {"synthetic": True}, hash_content=False)
        return open_cache(folder)
