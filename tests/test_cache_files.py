"""Tests of usae_cache_files, the cache's file layer, on planted data: sizes, kept positions,
statistics, the request that names a cache and the in-place shrinking of a pre-allocated array.
(Whole builds, resumes and damage are tested through usae_cache in test_cache.py.)"""
import numpy as np
import pytest

import usae_cache_files as cache_files


def test_bytes_per_image_is_fp16_tokens_times_the_summed_widths():
    assert cache_files.cache_bytes_per_image([384, 768, 768], 196) == 752_640
    assert cache_files.cache_bytes_per_image((8,), 1) == 16


def test_token_positions_are_a_seeded_sorted_subset_of_the_grid():
    drawn = cache_files.token_positions(3, 17, 196, 40)
    assert drawn.dtype == np.int16 and len(drawn) == 40 == len(np.unique(drawn))
    assert np.all(np.diff(drawn) > 0) and drawn.min() >= 0 and drawn.max() < 196
    assert np.array_equal(drawn, cache_files.token_positions(3, 17, 196, 40))  # reproducible
    assert not np.array_equal(drawn, cache_files.token_positions(3, 18, 196, 40))  # per image
    assert not np.array_equal(drawn, cache_files.token_positions(4, 17, 196, 40))  # per seed
    assert np.array_equal(cache_files.token_positions(3, 17, 196, 196), np.arange(196))


def test_scalar_statistics_keep_the_std_of_a_large_mean():
    """Rows come in blocks of ``tokens`` rows per image; only the chosen images count. A mean
    160 times the spread, in fp16: numpy's float64 mean and unbiased std of those rows."""
    rng = np.random.default_rng(0)
    tokens, width = 5, 7
    array = (40 + 0.25 * rng.standard_normal((100 * tokens, width))).astype(np.float16)
    chosen = sorted(rng.choice(100, size=70, replace=False).tolist())
    rows = np.concatenate([array[i * tokens:(i + 1) * tokens] for i in chosen]).astype(np.float64)
    mean, std = cache_files.scalar_stats(array, chosen, tokens)
    assert mean == pytest.approx(rows.mean(), rel=1e-12)
    assert std == pytest.approx(rows.std(ddof=1), rel=1e-9)


def request(seed=0, tokens=196, names=("a", "b")):
    class Images:  # what request_for reads of an ImageSet
        def sha256(self):
            return "f" * 64

        def __len__(self):
            return 10

    models = [{"name": n, "width": 4, "layer": "x", "grid": 14, "preprocessing": None,
               "describe": {}} for n in names]
    return cache_files.request_for(models, Images(), 14, tokens, seed, 1000)


def test_the_seed_enters_the_request_only_where_it_draws_something():
    assert request(seed=0) == request(seed=1)  # all tokens, every image in the statistics
    assert request(seed=0, tokens=40) != request(seed=1, tokens=40)


def test_a_cache_of_another_request_is_refused_naming_what_differs(tmp_path):
    record = {"request": request(tokens=40), "request_sha256": None}
    cache_files.check_request(record, request(tokens=40), tmp_path, unfinished=True)
    with pytest.raises(cache_files.CacheMismatchError) as error:
        cache_files.check_request(record, request(tokens=50, names=("a", "c")), tmp_path,
                                  unfinished=True)
    message = str(error.value)
    assert "tokens_per_image: cached 40, requested 50" in message
    assert "models: cached ['a', 'b'], requested ['a', 'c']" in message
    assert "rebuild=True" in message and str(tmp_path) in message


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_a_preallocated_array_shrinks_in_place_to_its_filled_rows(tmp_path, version):
    path = tmp_path / "a.npy"
    full = np.arange(40 * 3, dtype=np.float16).reshape(40, 3)
    with open(path, "wb") as handle:
        np.lib.format.write_array(handle, full, version=version)
    cache_files._shrink_npy(path, 11)
    shrunk = np.load(path, allow_pickle=False)
    assert shrunk.shape == (11, 3) and np.array_equal(shrunk, full[:11])
    cache_files._shrink_npy(path, 11)  # again, as after a kill between its two writes
    assert np.array_equal(np.load(path, allow_pickle=False), full[:11])
