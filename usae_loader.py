"""Reading an activation cache: shuffled, token-aligned batches for training, rows in order for
the analyses, and the per-channel means of the standardisation sample.

:class:`TokenLoader` streams endless shuffled batches from a :class:`usae_cache.Cache` without
loading it whole, so a cache larger than RAM trains fine; one :class:`LoaderConfig` says how
(batch size, seed, device, shuffle granularity), and :meth:`TokenLoader.iter_from` seeks to any
step, so that a resumed training run sees the batches an uninterrupted one would.
:func:`iter_rows` reads rows in cache order; :func:`channel_means` reads the per-channel means
that per-channel centring needs.

Of the project this module imports ``usae_cache`` (``Cache``, ``open_cache``) and ``usae_core``
(``STD_EPS`` and the argument checks).
"""
from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from usae_cache import Cache, open_cache
from usae_checks import is_int, require_device, require_seed
from usae_core import STD_EPS


@dataclass(frozen=True)
class LoaderConfig:
    """How a :class:`TokenLoader` draws, reads and delivers its batches; checked when made.

    Attributes
    ----------
    batch_size : int
        Tokens per batch, at least 2 (BatchNorm); 6,272 = 32 images x 196 tokens in the paper.
    seed : int
        Seeds every epoch's order, in [0, 2**63).
    device : str or torch.device
        Where batches are put (cast from fp16 to fp32 there, so half the bytes move).
    standardize : bool
        Apply ``(x - mean) / (std + 1e-5)`` with the cache's statistics. Off by default: the
        USAE applies its own standardisation.
    chunk_rows : int
        Contiguous rows that keep together in an epoch's order: the shuffle granularity (see
        :class:`TokenLoader`), at least 1.
    buffer_chunks : int
        Chunks read into one buffer, inside which rows are shuffled, at least 1.
    prefetch : bool
        Read the next buffer in a background thread while the current one is served.

    Raises
    ------
    ValueError
        A size or seed out of range, or a device that is unknown or not there.
    """

    batch_size: int = 6272
    seed: int = 0
    device: str | torch.device = "cpu"
    standardize: bool = False
    chunk_rows: int = 4096
    buffer_chunks: int = 32
    prefetch: bool = True

    def __post_init__(self) -> None:
        for value, what, low in ((self.batch_size, "batch_size", 2),
                                 (self.chunk_rows, "chunk_rows", 1),
                                 (self.buffer_chunks, "buffer_chunks", 1)):
            if not is_int(value, low):
                raise ValueError(f"{what} must be an integer >= {low}, got {value!r}"
                                 + (" (BatchNorm needs at least 2 tokens)."
                                    if what == "batch_size" else "."))
        require_seed(self.seed)
        require_device(self.device)


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
        A cache, or a folder for :func:`usae_cache.open_cache`.
    config : LoaderConfig, optional
        Batch size, seed, device and the rest; the defaults when omitted.
    names : sequence of str, optional
        The cache's models to read (default: all). The row order does not depend on them: an
        independent SAE reads only its model's columns, in the order the USAE reads all of them.

    Examples
    --------
    >>> loader = TokenLoader(cache, LoaderConfig(batch_size=1024, seed=0))  # doctest: +SKIP
    >>> batch = next(iter(loader))  # doctest: +SKIP
    """

    def __init__(self, cache: Cache | str | os.PathLike,
                 config: LoaderConfig | None = None, names: Sequence[str] | None = None) -> None:
        config = LoaderConfig() if config is None else config
        if not isinstance(config, LoaderConfig):
            raise TypeError(f"config must be a LoaderConfig, got {config!r}; e.g. "
                            "TokenLoader(cache, LoaderConfig(batch_size=1024, seed=0)).")
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache)
        self.names = list(self.cache.names if names is None else names)
        unknown = sorted(set(self.names) - set(self.cache.names))
        if unknown or not self.names:
            raise ValueError(f"names must be some of the cache's models {self.cache.names}, got "
                             f"{list(names)!r}.")
        self.config = config
        self.device = torch.device(config.device)
        self.n_rows = self.cache.n_tokens
        self.n_chunks = -(-self.n_rows // config.chunk_rows)
        self.rows_read = 0  # rows read from the cache (per model), for tests and benchmarks
        self.largest_read = 0  # most rows of one array read at once

    @property
    def batches_per_epoch(self) -> float:
        return self.n_rows / self.config.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iter_from(0)

    def _epoch_buffers(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The chunks of each buffer of an epoch (sorted, for sequential reads) and their ends."""
        chunk_rows, buffer_chunks = self.config.chunk_rows, self.config.buffer_chunks
        order = np.random.default_rng([self.config.seed, epoch]).permutation(self.n_chunks)
        buffers = [np.sort(order[i:i + buffer_chunks])
                   for i in range(0, self.n_chunks, buffer_chunks)]
        sizes = [sum(min(chunk_rows, self.n_rows - c * chunk_rows) for c in chunks)
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
        chunk_rows = self.config.chunk_rows
        spans = [(c * chunk_rows, min((c + 1) * chunk_rows, self.n_rows))
                 for c in chunks.tolist()]
        total = sum(b - a for a, b in spans)
        data = {}
        for name in self.names:
            array = self.cache.arrays[name]
            buffer = np.empty((total, array.shape[1]), dtype=array.dtype)
            at = 0
            for a, b in spans:
                buffer[at:at + b - a] = array[a:b]  # a plain copy: numpy drops the GIL here
                at += b - a
            data[name] = buffer
        self.rows_read += total
        self.largest_read = max(self.largest_read, max(b - a for a, b in spans))
        order = np.random.default_rng([self.config.seed, epoch, index + 1]).permutation(total)
        return data, order

    def iter_from(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from global batch index ``step`` onwards, as a fresh iteration would give.

        Nothing before the buffer that holds the first requested row is read: resuming at step
        one million costs one buffer read (two with prefetching). The order depends on the
        cache, ``seed``, ``batch_size``, ``chunk_rows`` and ``buffer_chunks``, so a resumed run
        must use the same ones (not on ``prefetch`` or ``device``).
        """
        if not is_int(step, 0):
            raise ValueError(f"step must be a non-negative integer, got {step!r}.")
        batch_size = self.config.batch_size
        epoch, offset = divmod(step * batch_size, self.n_rows)
        plan = self._plan(epoch, offset)
        pool = concurrent.futures.ThreadPoolExecutor(1) if self.config.prefetch else None
        def buffers() -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, int]]:
            spec = next(plan)
            pending = pool.submit(self._read, *spec[:3]) if pool else None
            while True:
                data, order = pending.result() if pool else self._read(*spec[:3])
                start = spec[3]
                spec = next(plan)
                if pool:  # read the next buffer while this one is served
                    pending = pool.submit(self._read, *spec[:3])
                yield data, order, start
                del data, order

        try:
            for parts in cut_batches(buffers(), self.names, batch_size):
                yield self._batch(parts)
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
            if self.config.standardize:
                mean, std = self.cache.standardization[name]
                values.sub_(mean).div_(std + STD_EPS)
            batch[name] = values
        return batch


def cut_batches(buffers: Iterable[tuple[Mapping[str, np.ndarray], np.ndarray, int]],
                names: Sequence[str], batch_size: int) -> Iterator[dict[str, list[np.ndarray]]]:
    """Consecutive batches of ``batch_size`` rows from shuffled buffers, as lists of pieces.

    Each buffer is ``(data, order, start)``: model name -> rows, the order in which to serve
    them, and the first position of ``order`` to serve (a resumed run starts mid-buffer). A batch
    may span buffers; rows of every model are taken at the same positions, so they stay aligned.
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    need = batch_size
    for data, order, start in buffers:
        while start < len(order):
            take = order[start:start + need]
            for name in names:
                parts[name].append(data[name][take])
            start += len(take)
            need -= len(take)
            if need == 0:
                yield parts
                parts, need = {name: [] for name in names}, batch_size
        del data, order  # before the next buffer is read: one buffer in memory, not two


def iter_rows(cache: Cache, batch_size: int = 16384, *,
              device: str | torch.device = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive rows in cache order, as float32 tensors (the analyses' reading order:
    whole images stay together when ``batch_size`` is a multiple of the tokens per image)."""
    if not is_int(batch_size, 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    for start in range(0, cache.n_tokens, batch_size):
        stop = min(start + batch_size, cache.n_tokens)
        yield {name: torch.from_numpy(np.array(cache.arrays[name][start:stop]))
               .to(device, torch.float32) for name in cache.names}


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
