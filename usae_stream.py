"""Training without a cache: images -> backbones -> shuffled, co-indexed token batches, on the fly.

For disks that cannot hold the activation cache (``usae_cache``): :class:`TokenStream` decodes
images in worker processes, runs every backbone on the same images in the main process, keeps
the same seeded grid positions per image as the cache (``usae_cache_files.token_positions``),
shuffles tokens inside a bounded buffer and yields the batches ``usae_checkpoint.train`` takes:
a dict model name -> float32 ``(batch_size, width)`` tensor of raw activations, row ``i`` of
every model the same image and grid position. It is seeded, re-iterable (epochs) and seekable
(:meth:`TokenStream.iter_from`), so a killed training run resumes with the batches an
uninterrupted one would have seen.

The order of the stream
    Epoch ``e`` visits the images in a seeded permutation of ``(seed, e)``, cut into *chunks* of
    ``buffer_images`` consecutive images. A chunk is extracted as a whole (its images decoded,
    forwarded, their kept positions gathered, rounded to float16 as the cache stores them) and
    its rows are shuffled by a permutation of ``(seed, e, chunk)``. The stream is the
    concatenation of the chunks, epoch after epoch; batches are consecutive ``batch_size`` slices
    of it, so no row is dropped and a batch mixes the images of one chunk, or of two consecutive
    chunks where it straddles a boundary. The shuffle is as local as that: tokens of one batch
    come from about ``buffer_images`` images, not from the whole set (the cache's loader mixes
    about 670 images per batch with its defaults).

Images that fail, and exact resume
    An image that cannot be decoded or preprocessed, or whose activations are not finite in
    float16 for some model, is skipped for every model, as the cache skips it
    (``usae_cache.load_for_models`` and ``usae_cache.extract_batch`` are reused, so both skip the
    same images and keep the same tokens); :attr:`TokenStream.skipped` lists each with its
    reason. A skipped image shifts every later row, so where batch ``s`` begins depends on which
    earlier images failed. The stream learns that only by trying an image once, and it records
    what it learnt: the chunks it has tried while they held untried images, and the skipped
    images with their reasons. With ``StreamConfig.record`` (a JSON file, written atomically by
    rank 0 after each such chunk, e.g. beside the checkpoint) a new process reads it back, and
    ``iter_from(step)`` computes where step ``step`` begins without running any backbone: it
    extracts only the chunk that holds it. After the first epoch every image has been tried and
    nothing more is written. Without a record, a fresh process re-extracts the chunks it knows
    nothing about before the step (exact, but it costs their backbone time once). A record made
    for other images, backbones, tokens, seed or chunk size is refused.

With several processes (``usae_distributed``)
    Every rank runs the same seeded stream and so builds the same global batches, which
    ``usae_distributed.train`` slices: correct, but the decoding and the backbones' forward
    passes are repeated on every rank (N ranks pay N times the extraction compute of one).

Standardisation
    Batches are raw. ``usae_core.train`` fits the standardisation on the first batch unless it is
    set; to set it as the cache does, ``model.set_standardization(stream.statistics())``: one
    scalar mean and unbiased std per model over every kept token of a seeded sample of images
    (the cache's definition and the same sample when no image is skipped).

Of the project this module imports ``usae_cache`` (the per-image loading and the batched
extraction of a cache build), ``usae_cache_files`` (the kept positions, the statistics),
``usae_checks``, ``usae_images`` and ``usae_io``.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

import usae_cache_files as cache_files
import usae_io
from usae_cache import extract_batch, load_for_models
from usae_checks import is_int, require_device, require_seed
from usae_images import ImageSet, list_images
from usae_loader import cut_batches

RECORD_FORMAT = "usae-stream-record/1"
# Sub-streams of the seed, apart from the cache's positions (1) and statistics (2) streams.
_ORDER_STREAM, _SHUFFLE_STREAM = 11, 12


@dataclass(frozen=True)
class StreamConfig:
    """How a :class:`TokenStream` cuts, shuffles and delivers its batches; checked when made.

    Attributes
    ----------
    batch_size : int
        Tokens per batch (the *global* batch under ``usae_distributed``), at least 2 (BatchNorm).
    tokens_per_image : int, optional
        Grid positions kept per image, a seeded draw shared by every model (the cache's
        ``tokens_per_image``); None keeps all ``grid * grid``.
    buffer_images : int
        Images per chunk: the shuffle buffer. Memory is about ``buffer_images *
        tokens_per_image * sum(widths) * 2`` bytes (float16) plus one batch: 256 images of the
        paper's trio (196 tokens, widths 768 x 3) hold 231 MB.
    seed : int
        Seeds the image order of every epoch, the shuffle and the kept positions, in [0, 2**63).
    workers : int
        Processes that decode and preprocess images while the backbones run (0: in this one).
    device : str or torch.device
        Where the backbones run and the batches are delivered.
    forward_images : int
        Images per forward pass of each backbone.
    record : path, optional
        A JSON file where the stream records which images it has tried and which failed, so
        that a resumed run seeks without re-running the backbones (see the module notes). It
        must be on a file system every rank can read; None keeps that knowledge in memory only.

    Raises
    ------
    ValueError
        A size or seed out of range, an unknown or absent device, or a record that is a folder.
    """

    batch_size: int = 6272
    tokens_per_image: int | None = None
    buffer_images: int = 256
    seed: int = 0
    workers: int = 4
    device: str | torch.device = "cpu"
    forward_images: int = 32
    record: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        for value, what, low in ((self.batch_size, "batch_size", 2),
                                 (self.buffer_images, "buffer_images", 1),
                                 (self.workers, "workers", 0),
                                 (self.forward_images, "forward_images", 1)):
            if not is_int(value, low):
                raise ValueError(f"{what} must be an integer >= {low}, got {value!r}"
                                 + (" (BatchNorm needs at least 2 tokens)."
                                    if what == "batch_size" else "."))
        if self.tokens_per_image is not None and not is_int(self.tokens_per_image, 1):
            raise ValueError(f"tokens_per_image must be a positive integer or None (all grid "
                             f"positions), got {self.tokens_per_image!r}.")
        require_seed(self.seed)
        require_device(self.device)
        if self.record is not None:
            if not isinstance(self.record, (str, os.PathLike)):
                raise ValueError(f"record must be a file path or None, got {self.record!r}.")
            if Path(self.record).is_dir():
                raise ValueError(f"record {self.record} is a folder; name a JSON file, e.g. "
                                 "runs/usae.stream.json beside the checkpoint.")


class _Decode(Dataset):
    """Image ``indices[k]`` decoded once and preprocessed for every model (a worker's job)."""

    def __init__(self, images: ImageSet, backbones: list, indices: Sequence[int]) -> None:
        self.images, self.backbones, self.indices = images, backbones, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, list | None, str | None]:
        index = int(self.indices[k])
        pixels, reason = load_for_models(self.images.absolute(index), self.backbones)
        return index, pixels, reason


def _as_is(sample: Any) -> Any:
    return sample


class TokenStream:
    """Shuffled, co-indexed token batches extracted from images on the fly (see module doc).

    Parameters
    ----------
    backbones : sequence of Backbone
        Distinct names (the batches' keys, as in a cache), one common grid. Moved to
        ``config.device`` and put in eval mode when the stream first runs them.
    images : ImageSet or path
        A path is listed with :func:`usae_images.list_images`.
    config : StreamConfig, optional
        Batch size, tokens per image, buffer, seed and the rest; the defaults when omitted.

    Raises
    ------
    ValueError
        No backbone, duplicate names, different grids, a backbone without ``name``, ``width``,
        ``grid`` or ``preprocess``, ``tokens_per_image`` above ``grid * grid``, no image, or a
        record written for another stream.

    Examples
    --------
    >>> stream = TokenStream(backbones, "photos/train", StreamConfig(
    ...     batch_size=1024, record="runs/usae.stream.json"))  # doctest: +SKIP
    >>> model = usae_core.USAE(stream.widths, n_concepts=1024, k=16, seed=0)  # doctest: +SKIP
    >>> model.set_standardization(stream.statistics())  # doctest: +SKIP
    >>> usae_checkpoint.train(model, stream, 2000, checkpoint_path="runs/usae.safetensors",
    ...                       checkpoint_every=500)  # doctest: +SKIP
    """

    def __init__(self, backbones: Sequence[Any], images: ImageSet | str | os.PathLike,
                 config: StreamConfig | None = None) -> None:
        config = StreamConfig() if config is None else config
        if not isinstance(config, StreamConfig):
            raise TypeError(f"config must be a StreamConfig, got {config!r}; e.g. "
                            "TokenStream(backbones, images, StreamConfig(batch_size=1024)).")
        self.backbones = list(backbones)
        if not self.backbones:
            raise ValueError("a TokenStream needs at least one backbone.")
        for bb in self.backbones:
            missing = [a for a in ("name", "width", "grid", "preprocess") if not hasattr(bb, a)]
            if missing:
                raise ValueError(f"{bb!r} is not a backbone: it lacks {missing}; load one with "
                                 "usae_backbones.load_backbone.")
        names = [bb.name for bb in self.backbones]
        if len(set(names)) != len(names):
            raise ValueError(f"backbone names must be distinct (they key the batches), got "
                             f"{names}.")
        grids = {bb.name: int(bb.grid) for bb in self.backbones}
        if len(set(grids.values())) != 1:
            raise ValueError(f"all backbones must share one token grid to align tokens, got "
                             f"{grids}.")
        self.grid = next(iter(grids.values()))
        grid_tokens = self.grid ** 2
        self.tokens_per_image = (grid_tokens if config.tokens_per_image is None
                                 else config.tokens_per_image)
        if self.tokens_per_image > grid_tokens:
            raise ValueError(f"tokens_per_image must be within 1..{grid_tokens} (the "
                             f"{self.grid}x{self.grid} grid), got {config.tokens_per_image}.")
        self.images = images if isinstance(images, ImageSet) else list_images(images)
        if len(self.images) == 0:
            raise ValueError("the image set is empty; pass a folder of images or a non-empty "
                             "ImageSet.")
        self.config = config
        self.device = torch.device(config.device)
        self.n_images = len(self.images)
        self.chunks_per_epoch = -(-self.n_images // config.buffer_images)
        self._tried = np.zeros(self.n_images, dtype=bool)
        self._failed = np.zeros(self.n_images, dtype=bool)
        self.skipped: dict[int, dict[str, str]] = {}  # image index -> {"path", "reason"}
        self._tried_chunks: list[list[int]] = []
        self._orders: dict[int, np.ndarray] = {}
        self._ready = False
        self.chunks_extracted = 0  # chunks run through the backbones, for tests and benchmarks
        self._key = usae_io.sha256_json(self._identity())
        if config.record is not None and Path(config.record).exists():
            self._load_record(Path(config.record))

    # ---- what the stream is ------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [bb.name for bb in self.backbones]

    @property
    def widths(self) -> dict[str, int]:
        return {bb.name: int(bb.width) for bb in self.backbones}

    @property
    def rows_per_epoch(self) -> int | None:
        """Tokens per epoch, once every image has been tried (None before)."""
        if not self._tried.all():
            return None
        return int(self.n_images - self._failed.sum()) * self.tokens_per_image

    def _identity(self) -> dict:
        """Everything that decides which images a chunk holds and which of them fail."""
        describe = [cache_files.json_normal(bb.describe()) if hasattr(bb, "describe")
                    else {"name": bb.name} for bb in self.backbones]
        return {"format": RECORD_FORMAT, "images": self.images.sha256(), "models": describe,
                "widths": self.widths, "grid": self.grid, "tokens": self.tokens_per_image,
                "seed": self.config.seed, "buffer_images": self.config.buffer_images}

    # ---- the record of tried and failed images ----------------------------------------------

    def _load_record(self, path: Path) -> None:
        try:
            record = json.loads(path.read_text())
            key, chunks, skipped = record["key"], record["chunks"], record["skipped"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"the stream record {path} cannot be read ({error}); delete it (the "
                             "stream then re-extracts what it needs to resume).") from error
        if key != self._key:
            raise ValueError(f"the stream record {path} was written for another stream (other "
                             "images, backbones, tokens_per_image, seed or buffer_images); name "
                             "another record file, or delete this one.")
        for epoch, chunk in chunks:
            self._tried[self._chunk_images(epoch, chunk)] = True
        for item in skipped:
            self._failed[item["index"]] = True
            self.skipped[item["index"]] = {"path": item["path"], "reason": item["reason"]}
        self._tried_chunks = [list(c) for c in chunks]
        self._refuse_if_nothing_usable()

    def _save_record(self) -> None:
        if self.config.record is None or (dist.is_available() and dist.is_initialized()
                                          and dist.get_rank() != 0):
            return  # rank 0 writes it; the others compute the same facts
        record = {"format": RECORD_FORMAT, "key": self._key, "identity": self._identity(),
                  "chunks": self._tried_chunks,
                  "skipped": [{"index": i, **self.skipped[i]} for i in sorted(self.skipped)]}
        usae_io.atomic_write(self.config.record, json.dumps(record, indent=1))

    # ---- the order of the stream --------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # an ImageNet order is 10 MB: keep this epoch's and one
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng(
                [self.config.seed, _ORDER_STREAM, epoch]).permutation(self.n_images)
        return self._orders[epoch]

    def _chunk_images(self, epoch: int, chunk: int) -> np.ndarray:
        size = self.config.buffer_images
        return self._epoch_order(epoch)[chunk * size:(chunk + 1) * size]

    def _chunk_rows(self, epoch: int, chunk: int) -> int | None:
        """Rows of a chunk, if every image in it has been tried (None otherwise)."""
        members = self._chunk_images(epoch, chunk)
        if not self._tried[members].all():
            return None
        return int((~self._failed[members]).sum()) * self.tokens_per_image

    def _seek(self, target: int) -> tuple[int, int, int]:
        """(epoch, chunk, rows to skip in it) of stream row ``target``, as far as known: stops
        early, at the first chunk whose size is unknown, with the rows still to skip."""
        epoch, chunk = 0, 0
        per_epoch = self.rows_per_epoch
        assert per_epoch != 0, "an epoch without rows is refused when it is learnt"
        if per_epoch:  # every image tried: whole epochs are skipped by arithmetic
            epoch, target = divmod(target, per_epoch)
        while True:
            rows = self._chunk_rows(epoch, chunk)
            if rows is None or rows > target:
                return epoch, chunk, target
            target -= rows
            chunk += 1
            if chunk == self.chunks_per_epoch:
                epoch, chunk = epoch + 1, 0

    # ---- extraction ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        if not self._ready:
            for bb in self.backbones:
                bb.to(self.device).eval()
            self._ready = True

    def _decoded(self, indices: Sequence[int]) -> Iterator[tuple[int, list | None, str | None]]:
        """(index, pixels per model or None, reason) of each image, in order, decoded ahead by
        ``workers`` processes."""
        workers = self.config.workers
        loader = DataLoader(_Decode(self.images, self.backbones, indices), batch_size=None,
                            shuffle=False, num_workers=workers, collate_fn=_as_is,
                            prefetch_factor=4 if workers else None)
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            del iterator  # stops the worker processes of an abandoned epoch

    def _forward(self, samples: list) -> tuple[dict[str, np.ndarray], list[int], dict]:
        """Run every backbone over decoded images: name -> float16 rows of the kept images
        (image-major, kept positions in raster order), the kept indices, and the failures."""
        failures = {index: reason for index, pixels, reason in samples if pixels is None}
        good = [(index, pixels) for index, pixels, _ in samples if pixels is not None]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        step = self.config.forward_images
        for start in range(0, len(good), step):
            group = good[start:start + step]
            blocks, failed = extract_batch(self.backbones, group, self.tokens_per_image,
                                      self.config.seed, self.device)
            failures.update(failed)
            for name, rows in blocks.items():
                parts[name].append(rows)
        kept = [index for index, _ in good if index not in failures]
        data = {bb.name: (np.concatenate(parts[bb.name]) if parts[bb.name]
                          else np.empty((0, bb.width), dtype=np.float16))
                for bb in self.backbones}
        assert all(len(rows) == len(kept) * self.tokens_per_image for rows in data.values())
        return data, kept, failures

    def _learn(self, epoch: int, chunk: int, members: np.ndarray, failures: dict) -> None:
        """Take note of which images of a chunk failed; refuse a chunk that contradicts what
        was noted before (the images changed), since the row offsets rest on it."""
        known = self._tried[members]
        for index in members[known].tolist():
            if (index in failures) != bool(self._failed[index]):
                was = self.skipped.get(index, {}).get("reason", "decoded and used")
                now = "fails" if index in failures else "is usable"
                raise RuntimeError(
                    f"image {self.images.paths[index]} now {now} but was {was!r} before: the "
                    "images changed during the run, so the row offsets are no longer exact; "
                    f"delete the stream record "
                    f"({self.config.record}) and start training afresh.")
        if known.all():
            return
        for index, reason in failures.items():
            self._failed[index] = True
            self.skipped[index] = {"path": self.images.paths[index], "reason": reason}
        self._tried[members] = True
        self._tried_chunks.append([epoch, chunk])
        self._save_record()
        self._refuse_if_nothing_usable()

    def _refuse_if_nothing_usable(self) -> None:
        if self._tried.all() and self._failed.all():
            examples = "; ".join(f"{s['path']}: {s['reason']}"
                                 for s in list(self.skipped.values())[:5])
            raise ValueError(f"no image of {self.images.root} could be used ({self.n_images} "
                             f"skipped, e.g. {examples}); check the folder.")

    def _chunks(self, epoch: int, chunk: int) -> Iterator[tuple[dict, np.ndarray]]:
        """Every chunk from (epoch, chunk) on, endlessly: its rows and their shuffled order."""
        self._prepare()
        while True:
            order = self._epoch_order(epoch)
            size = self.config.buffer_images
            decoded = self._decoded(order[chunk * size:])
            try:
                for c in range(chunk, self.chunks_per_epoch):
                    members = self._chunk_images(epoch, c)
                    samples = [next(decoded) for _ in range(len(members))]
                    assert [s[0] for s in samples] == members.tolist()
                    data, kept, failures = self._forward(samples)
                    self.chunks_extracted += 1
                    self._learn(epoch, c, members, failures)
                    rows = len(kept) * self.tokens_per_image
                    assert rows == self._chunk_rows(epoch, c)
                    shuffle = np.random.default_rng(
                        [self.config.seed, _SHUFFLE_STREAM, epoch, c]).permutation(rows)
                    yield data, shuffle
            finally:
                decoded.close()
            epoch, chunk = epoch + 1, 0

    # ---- batches ------------------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> float | None:
        """Batches per epoch (a fraction: batches straddle epochs), once every image is tried."""
        rows = self.rows_per_epoch
        return None if rows is None else rows / self.config.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The endless stream from its start, epoch after epoch, as ``usae_loader.TokenLoader``:
        a batch that straddles two epochs takes the rows of both, so none is dropped."""
        return self.iter_from(0)

    def iter_from(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches from global batch index ``step`` on, as a fresh iteration gives them.

        Where batch ``step`` begins is computed from the chunks' sizes: known without any
        backbone for the chunks already tried (by this object or, through ``config.record``, by
        an earlier process); others before it are extracted first. The first batch costs one
        chunk's extraction. The order depends on the images, the backbones, ``seed``,
        ``batch_size``, ``tokens_per_image`` and ``buffer_images``, so a resumed run must use
        the same ones (not the same ``workers``, ``forward_images`` or ``device``).
        """
        if not is_int(step, 0):
            raise ValueError(f"step must be a non-negative integer, got {step!r}.")
        batch_size = self.config.batch_size
        target = step * batch_size
        while True:
            epoch, chunk, skip = self._seek(target)
            chunks = self._chunks(epoch, chunk)
            try:
                for data, shuffle in chunks:
                    if skip and skip >= len(shuffle):
                        # An untried chunk before the target, extracted only to learn its size;
                        # seek again as soon as the sizes ahead are known (no backbone then).
                        skip -= len(shuffle)
                        chunk = (chunk + 1) % self.chunks_per_epoch
                        epoch += chunk == 0
                        if self._chunk_rows(epoch, chunk) is not None:
                            break
                        continue
                    yield from self._serve(chunks, data, shuffle, skip)
            finally:
                chunks.close()

    def _serve(self, chunks: Iterator, data: dict, shuffle: np.ndarray,
               skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from row ``skip`` of the shuffled chunk ``data`` on, then from ``chunks``."""
        buffers = itertools.chain([(data, shuffle, skip)],
                                  ((data, shuffle, 0) for data, shuffle in chunks))
        del data, shuffle
        for parts in cut_batches(buffers, self.names, self.config.batch_size):
            yield self._batch(parts)

    def _batch(self, parts: dict[str, list[np.ndarray]]) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.concatenate(pieces)).to(self.device, torch.float32)
                for name, pieces in parts.items()}

    # ---- standardisation ------------------------------------------------------------------------

    def statistics(self, sample_images: int = 1000) -> dict[str, tuple[float, float]]:
        """Scalar (mean, unbiased std) per model over every kept token of a seeded sample of
        images, for ``model.set_standardization``: the cache's definition
        (``usae_cache_files.scalar_stats``), and the cache's sample when no image is skipped
        (failing images of the sample are left out; the sample is not topped up).

        Costs one extraction of ``min(sample_images, n_images)`` images.
        """
        if not is_int(sample_images, 1):
            raise ValueError(f"sample_images must be a positive integer, got {sample_images!r}.")
        self._prepare()
        sample = cache_files.statistics_sample(self.config.seed, self.n_images, sample_images)
        data, kept, failures = self._forward(list(self._decoded(sample)))
        if not kept:
            raise ValueError(f"none of the {len(sample)} sampled images could be used (e.g. "
                             f"{next(iter(failures.values()))}); check the folder.")
        return {name: cache_files.scalar_stats(rows, np.arange(len(kept)), self.tokens_per_image)
                for name, rows in data.items()}
