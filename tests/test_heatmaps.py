"""usae_heatmaps: heatmaps on the token grid, overlays, the shared colour scale and numbers as
the explorer prints them, on hand-made sparse codes with planted concepts (conftest)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

import usae_heatmaps as hm
from conftest import GRID, N_CONCEPTS, T, photo, to_sparse


def test_heatmap_peaks_at_the_planted_position_and_upsampling_keeps_it(codes):
    maps = hm.concept_heatmaps(codes["b"], [1, 4, 0], 2, grid=GRID)
    assert maps.shape == (3, GRID, GRID) and maps.dtype == np.float32
    assert np.unravel_index(maps[0].argmax(), maps[0].shape) == (3, 5)
    assert np.unravel_index(maps[1].argmax(), maps[1].shape) == (10, 2)
    assert maps[0, 3, 5] == 4.0 and np.count_nonzero(maps[:2]) == 2 and not maps[2].any()
    big = hm.upsample_heatmap(maps[0], 224)
    assert big.shape == (224, 224) and big.min() == 0.0 and big.max() == pytest.approx(1.0)
    row, col = np.unravel_index(big.argmax(), big.shape)
    assert 3 * 16 <= row < 4 * 16 and 5 * 16 <= col < 6 * 16  # the planted 16 px cell
    batch = hm.upsample_heatmap(maps, 112)
    assert batch.shape == (3, 112, 112) and not batch[2].any()  # a blank map stays blank


def test_heatmaps_of_subsampled_tokens_place_kept_positions_and_leave_others_at_zero():
    rng = np.random.default_rng(0)
    kept = 40
    positions = np.stack([np.sort(rng.choice(T, kept, replace=False)) for _ in range(3)])
    full = torch.rand(3 * T, N_CONCEPTS)  # values on every grid position...
    rows = (np.arange(3)[:, None] * T + positions).reshape(-1)
    codes = to_sparse(full[torch.from_numpy(rows)])  # ...but the cache keeps 40 per image
    maps = hm.concept_heatmaps(codes, [2, 0], 6, grid=GRID, positions=positions)
    expected = np.zeros((3, T), dtype=np.float32)
    dense = codes.dense().view(3, kept, N_CONCEPTS)[:, :, 6].numpy()
    np.put_along_axis(expected, positions, dense, axis=1)
    np.testing.assert_array_equal(maps, expected.reshape(3, GRID, GRID)[[2, 0]])


def test_overlay_shape_range_and_zero_heat_leaves_the_image_unchanged():
    image = photo(3, size=(320, 180))  # not square: squashed as the models see it
    plain = hm.overlay(image, np.zeros((GRID, GRID)))
    assert plain.shape == (224, 224, 3) and plain.dtype == np.uint8
    np.testing.assert_array_equal(plain, hm.squash(image, 224))
    heat = np.zeros((GRID, GRID))
    heat[3, 5] = 1.0
    hot = hm.overlay(image, heat, size=224)
    assert hot.dtype == np.uint8 and 0 <= hot.min() and hot.max() <= 255
    yellow = np.array(matplotlib.colormaps["viridis"](1.0)[:3]) * 255
    peak = np.unravel_index(hm.upsample_heatmap(heat).argmax(), (224, 224))
    np.testing.assert_allclose(hot[peak], yellow, atol=1)  # full heat: opaque top colour
    changed = np.abs(hot.astype(int) - plain.astype(int)).sum(axis=2)
    assert changed[48:64, 80:96].mean() > 5 * changed[150:, 150:].mean()


def test_shared_scale_keeps_weak_maps_weak_and_numbers_never_print_minus_zero():
    strong, weak = np.zeros((GRID, GRID)), np.zeros((GRID, GRID))
    strong[3, 5], weak[3, 5] = 4.0, 1.0
    scaled = hm.scale_heatmap(np.stack([strong, weak]), 4.0, 112)
    assert 0.9 < scaled[0].max() <= 1.0  # bicubic peaks near, not always on, the cell value
    assert scaled[1].max() == pytest.approx(scaled[0].max() / 4, rel=1e-5)  # a quarter as hot
    assert hm.upsample_heatmap(weak, 112).max() == pytest.approx(1.0)  # min-max: as hot
    assert not hm.scale_heatmap(weak, 0.0, 56).any()
    r2 = np.full((GRID, GRID), 0.5)
    r2[0, 0] = np.nan
    picture = hm.colour_map(r2, 0.0, 1.0, size=56)
    assert picture.shape == (56, 56, 3) and (picture[0, 0] == 128).all()
    assert hm.fixed(-1e-9) == "0.00" and hm.fixed(-0.0) == "0.00" and hm.fixed(-0.5) == "-0.50"
    assert hm.number(-1e-12) == "0" and hm.number(0.012345) == "0.0123"
    bar = hm.colorbar_html(0, 4.0, label="code")
    assert "linear-gradient" in bar and ">4<" in bar and ">0<" in bar


def test_batched_overlays_equal_overlay_one_by_one(codes):
    """The fast path (one bicubic pass, the colour table, in-place arithmetic) gives the
    same pixels as overlay map by map: a shared scale, a scale per map (zero included: a map
    with nothing to show), per-map min-max, another alpha and colour map, and no map at all."""
    pictures = [hm.squash(photo(i), 224) for i in range(6)]
    maps = np.concatenate([hm.concept_heatmaps(codes[n], range(6), c, grid=GRID)
                           for n, c in (("a", 2), ("b", 7), ("c", 9))])[:6]
    maps[5] = np.random.default_rng(1).random((GRID, GRID)) * 3  # every cell hot
    scales = [4.0, 0.0, 2.5, 1e-3, 4.0, 3.0]
    for options in ({"vmax": 4.0}, {"vmax": scales}, {}, {"vmax": 1.5, "alpha": 0.6},
                    {"vmax": None, "cmap": "magma"}):
        batch = hm.overlays(pictures, maps, 224, **options)
        vmax = options.pop("vmax", None)
        for i, (picture, heat) in enumerate(zip(pictures, maps)):
            one = vmax[i] if isinstance(vmax, list) else vmax
            np.testing.assert_array_equal(batch[i], hm.overlay(picture, heat, 224, vmax=one,
                                                               **options))
    assert hm.overlays([], np.zeros((0, GRID, GRID)), 112, vmax=1.0).shape == (0, 112, 112, 3)
    small = [hm.squash(photo(0), 56)]
    np.testing.assert_array_equal(hm.overlays(small, maps[:1], 56, vmax=4.0)[0],
                                  hm.overlay(small[0], maps[0], 56, vmax=4.0))
