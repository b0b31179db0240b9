"""Tests of usae_loader: aligned, seeded, epoch-covering batches with bounded memory, seeking,
standardisation, and the refusal of a bad configuration."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import usae_cache as uc
import usae_images
from conftest import build_pair
from usae_loader import LoaderConfig, TokenLoader, iter_rows

# ----------------------------------------------------------------------------------------------
# Helpers


def identity_cache(tmp_path: Path, n_images: int = 30) -> uc.Cache:
    """A synthetic cache where row r of both models stores r in base 256 in columns 0..2."""
    folder = tmp_path / "ids"
    uc.make_synthetic_cache(folder, {"alpha": 4, "beta": 6}, n_images, stats_sample=10)
    for name in ("alpha", "beta"):
        array = np.load(folder / f"{name}.npy", mmap_mode="r+")
        rows = np.arange(len(array))
        array[:, 0], array[:, 1], array[:, 2] = rows % 256, rows // 256 % 256, rows // 65536
        array.flush()
        del array
    return uc.open_cache(folder)


def row_ids(tensor: torch.Tensor) -> np.ndarray:
    values = tensor[:, :3].double().numpy().round().astype(np.int64)
    return values[:, 0] + 256 * values[:, 1] + 65536 * values[:, 2]


# ----------------------------------------------------------------------------------------------
# Batches


def take(loader, count, start=0):
    return list(itertools.islice(loader.iter_from(start), count))


def test_loader_aligned_and_seeded(tmp_path):
    cache = identity_cache(tmp_path)
    config = LoaderConfig(batch_size=500, seed=3, chunk_rows=64, buffer_chunks=4)
    loader = TokenLoader(cache, config)
    batches = take(loader, 30)
    for batch in batches:
        assert set(batch) == {"alpha", "beta"} and batch["alpha"].dtype == torch.float32
        assert batch["alpha"].shape == (500, 4) and batch["beta"].shape == (500, 6)
        assert (row_ids(batch["alpha"]) == row_ids(batch["beta"])).all()
    again = take(TokenLoader(cache, dataclasses.replace(config, prefetch=False)), 30)
    assert all(torch.equal(x[n], y[n]) for x, y in zip(batches, again) for n in x)
    other = take(TokenLoader(cache, dataclasses.replace(config, seed=4)), 3)
    assert not torch.equal(other[0]["alpha"], batches[0]["alpha"])
    # A subset of the models reads only their columns, in the same row order.
    beta = take(TokenLoader(cache, config, ["beta"]), 30)
    assert all(set(b) == {"beta"} and torch.equal(b["beta"], full["beta"])
               for b, full in zip(beta, batches))
    with pytest.raises(ValueError, match="names must be some of the cache's models"):
        TokenLoader(cache, config, ["gamma"])


# 5,880 rows: the batch divides them, does not, is larger than an epoch
@pytest.mark.parametrize("batch_size", [490, 512, 6000])
def test_loader_epochs_cover_every_row_once(tmp_path, batch_size):
    cache = identity_cache(tmp_path)
    n = cache.n_tokens
    loader = TokenLoader(cache, LoaderConfig(batch_size=batch_size, chunk_rows=100,
                                             buffer_chunks=5))
    batches = take(loader, -(-3 * n // batch_size))
    stream = np.concatenate([row_ids(b["alpha"]) for b in batches])
    epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert (np.sort(epoch) == np.arange(n)).all()
    assert not (epochs[0] == epochs[1]).all()
    assert len(iter(loader).__next__()["alpha"]) == batch_size


def test_iter_from_matches_fresh_iteration(tmp_path):
    cache = identity_cache(tmp_path)
    config = LoaderConfig(batch_size=300, seed=5, chunk_rows=64, buffer_chunks=3)
    fresh = take(TokenLoader(cache, config), 45)  # ~2.3 epochs
    for step in (0, 1, 7, 19, 20, 40):
        loader = TokenLoader(cache, config)
        resumed = take(loader, 5, start=step)
        for x, y in zip(resumed, fresh[step:step + 5]):
            assert all(torch.equal(x[n], y[n]) for n in x)
    # Seeking far ahead reads only the buffers it serves (plus the one read ahead).
    loader = TokenLoader(cache, config)
    next(loader.iter_from(10_000))
    assert loader.rows_read <= 2 * 64 * 3 * 2


def test_iter_rows_reads_every_row_in_cache_order(tmp_path):
    cache = identity_cache(tmp_path)
    batches = list(iter_rows(cache, 1000))
    assert [len(b["alpha"]) for b in batches] == [1000] * 5 + [880]
    assert (np.concatenate([row_ids(b["beta"]) for b in batches]) == np.arange(5880)).all()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        next(iter_rows(cache, 0))


class RecordingArray:
    """Wraps a memmap: allows only row slices, records their sizes; no whole-array access."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None, key
        start, stop, _ = key.indices(self.shape[0])
        self.reads.append(stop - start)
        return self.array[key]


def test_loader_memory_is_bounded(tmp_path):
    cache = identity_cache(tmp_path)
    recorded = {name: RecordingArray(array) for name, array in cache.arrays.items()}
    wrapped = dataclasses.replace(cache, arrays=recorded)
    loader = TokenLoader(wrapped, LoaderConfig(batch_size=200, chunk_rows=50, buffer_chunks=4))
    batches = take(loader, 10)  # 2,000 rows served
    for array in recorded.values():
        assert max(array.reads) <= 50
        # served rows, plus at most one buffer being served and one read ahead
        assert sum(array.reads) <= 2000 + 2 * 50 * 4
    assert loader.largest_read <= 50 and len(batches) == 10


def test_loader_standardize_and_validation(tmp_path, write_coded_images):
    images = usae_images.list_images(write_coded_images(tmp_path / "imgs", 4))
    cache = build_pair(images, tmp_path / "c", batch_size=4, tokens_per_image=None)
    raw = next(iter(TokenLoader(cache, LoaderConfig(batch_size=64, seed=1))))
    scaled = next(iter(TokenLoader(tmp_path / "c",
                                   LoaderConfig(batch_size=64, seed=1, standardize=True))))
    for name, (mean, std) in cache.standardization.items():
        assert torch.allclose(scaled[name], (raw[name] - mean) / (std + 1e-5))
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            TokenLoader(cache, LoaderConfig(batch_size=bad))
    with pytest.raises(ValueError, match="step"):
        next(TokenLoader(cache, LoaderConfig(batch_size=8)).iter_from(-1))


# ----------------------------------------------------------------------------------------------
# Bad configuration, refused before any read


@pytest.mark.parametrize("options, message", [
    ({"chunk_rows": 0}, "chunk_rows must be an integer >= 1"),
    ({"buffer_chunks": -2}, "buffer_chunks must be an integer >= 1"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ({"seed": 0.5}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ({"seed": 2**63}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ({"device": "tpu"}, "'tpu' is not a torch device")])
def test_token_loader_refuses_nonsense(options, message, small_cache):
    with pytest.raises(ValueError, match=message):
        TokenLoader(small_cache, LoaderConfig(batch_size=8, **options))


def test_token_loader_refuses_a_missing_cache_and_options_outside_a_config(tmp_path,
                                                                          small_cache):
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        TokenLoader(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="LoaderConfig"):
        TokenLoader(small_cache, 1024)
