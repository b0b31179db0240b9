"""Heatmaps, figures and the concept explorer on hand-made sparse codes with planted concepts."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import usae_analysis as analysis
import usae_cache
import usae_explorer as ex
import usae_figures as figs

GRID, T, N_CONCEPTS, K, N_IMAGES = 14, 196, 16, 3, 6
NAMES = ("a", "b", "c")
# (concept, value, [(model, image, row, col), ...]): a universal concept (2), a concept of
# models a and b (7), one unique to model a (5). Background noise uses concepts 8..15 only.
PLANTS = [
    (2, 4.0, [(m, 1, 3, 5) for m in NAMES] + [(m, 4, 10, 2) for m in NAMES]),
    (7, 3.0, [("a", 1, 0, 0), ("b", 1, 0, 0)]),
    (5, 3.0, [("a", 2, 7, 7)]),
]


def to_sparse(dense: torch.Tensor) -> analysis.SparseCodes:
    """Top-k of a dense ``tokens x n`` matrix; zero slots get distinct unused concepts."""
    values, indices = torch.topk(dense, K, dim=1)
    return analysis.SparseCodes(indices.to(torch.int16), values.half(), dense.shape[1])


def planted_dense(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dense = {}
    for name in NAMES:
        z = torch.zeros(N_IMAGES * T, N_CONCEPTS)
        rows = torch.randint(0, N_IMAGES * T, (100,), generator=generator)
        concepts = torch.randint(8, N_CONCEPTS, (100,), generator=generator)
        z[rows, concepts] = 0.05 + 0.25 * torch.rand(100, generator=generator)
        dense[name] = z
    for concept, value, places in PLANTS:
        for model, image, row, col in places:
            dense[model][image * T + row * GRID + col, concept] = value
    # fp16 rounding happens in the sparse form: keep the dense reference identical to it
    return {n: to_sparse(z).dense() for n, z in dense.items()}


@pytest.fixture(scope="module")
def dense():
    return planted_dense()


@pytest.fixture(scope="module")
def codes(dense):
    return {n: to_sparse(z) for n, z in dense.items()}


def photo(i: int, size=(300, 200)) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def photos():
    return [photo(i) for i in range(N_IMAGES)]


@pytest.fixture
def explorer(codes, photos):
    return ex.ConceptExplorer(codes, photos, analysis.concept_statistics(codes), top_n=3)


# ---- heatmaps and overlays -------------------------------------------------------------------


def test_heatmap_peaks_at_the_planted_position_and_upsampling_keeps_it(codes):
    maps = ex.concept_heatmaps(codes["b"], [1, 4, 0], 2, grid=GRID)
    assert maps.shape == (3, GRID, GRID) and maps.dtype == np.float32
    assert np.unravel_index(maps[0].argmax(), maps[0].shape) == (3, 5)
    assert np.unravel_index(maps[1].argmax(), maps[1].shape) == (10, 2)
    assert maps[0, 3, 5] == 4.0 and np.count_nonzero(maps[:2]) == 2 and not maps[2].any()
    big = ex.upsample_heatmap(maps[0], 224)
    assert big.shape == (224, 224) and big.min() == 0.0 and big.max() == pytest.approx(1.0)
    row, col = np.unravel_index(big.argmax(), big.shape)
    assert 3 * 16 <= row < 4 * 16 and 5 * 16 <= col < 6 * 16  # the planted 16 px cell
    batch = ex.upsample_heatmap(maps, 112)
    assert batch.shape == (3, 112, 112) and not batch[2].any()  # a blank map stays blank


def test_heatmaps_of_subsampled_tokens_place_kept_positions_and_leave_others_at_zero():
    rng = np.random.default_rng(0)
    kept = 40
    positions = np.stack([np.sort(rng.choice(T, kept, replace=False)) for _ in range(3)])
    full = torch.rand(3 * T, N_CONCEPTS)  # values on every grid position...
    rows = (np.arange(3)[:, None] * T + positions).reshape(-1)
    codes = to_sparse(full[torch.from_numpy(rows)])  # ...but the cache keeps 40 per image
    maps = ex.concept_heatmaps(codes, [2, 0], 6, grid=GRID, positions=positions)
    expected = np.zeros((3, T), dtype=np.float32)
    dense = codes.dense().view(3, kept, N_CONCEPTS)[:, :, 6].numpy()
    np.put_along_axis(expected, positions, dense, axis=1)
    np.testing.assert_array_equal(maps, expected.reshape(3, GRID, GRID)[[2, 0]])


def test_overlay_shape_range_and_zero_heat_leaves_the_image_unchanged():
    image = photo(3, size=(320, 180))  # not square: squashed as the models see it
    plain = ex.overlay(image, np.zeros((GRID, GRID)))
    assert plain.shape == (224, 224, 3) and plain.dtype == np.uint8
    np.testing.assert_array_equal(plain, ex.squash(image, 224))
    heat = np.zeros((GRID, GRID))
    heat[3, 5] = 1.0
    hot = ex.overlay(image, heat, size=224)
    assert hot.dtype == np.uint8 and 0 <= hot.min() and hot.max() <= 255
    yellow = np.array(matplotlib.colormaps["viridis"](1.0)[:3]) * 255
    peak = np.unravel_index(ex.upsample_heatmap(heat).argmax(), (224, 224))
    np.testing.assert_allclose(hot[peak], yellow, atol=1)  # full heat: opaque top colour
    changed = np.abs(hot.astype(int) - plain.astype(int)).sum(axis=2)
    assert changed[48:64, 80:96].mean() > 5 * changed[150:, 150:].mean()


# ---- pure explorer logic ---------------------------------------------------------------------


def test_concept_order_by_each_key_equals_a_direct_sort(explorer, dense):
    energy = sum(z.mean(0).double().numpy() for z in dense.values())
    fires = np.stack([(z > 0.1).sum(0).numpy() for z in dense.values()])
    p = fires / np.maximum(fires.sum(0), 1)
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(0) / np.log(len(NAMES))
    cofires = np.logical_and.reduce([(z > 0.1).numpy() for z in dense.values()]).sum(0)
    proportion = np.where(fires > 0, cofires / np.maximum(fires, 1), 0).mean(0)
    live = [c for c in range(N_CONCEPTS) if fires[:, c].sum() > 0]
    assert len(live) < N_CONCEPTS  # dead concepts (1, 3, ...) are left out
    for key, values, sign in (("energy", energy, -1), ("firing entropy", entropy, -1),
                              ("co-fire proportion", proportion, -1),
                              ("model-unique (low entropy)", entropy, 1)):
        expected = sorted(live, key=lambda c: (round(sign * values[c], 9),
                                               round(-energy[c], 9), c))
        assert explorer.concept_order(key).tolist() == expected, key
    assert explorer.concept_order("energy")[0] == 2  # the strongest planted concept
    assert explorer.concept_order("model-unique (low entropy)")[0] == 5


def test_top_images_equal_a_brute_force_ranking(explorer, dense, codes):
    for concept in (2, 5, 7, 9, 12):
        top = explorer.top_images(concept)
        for name in NAMES:
            scores = dense[name].view(N_IMAGES, T, N_CONCEPTS)[:, :, concept].double().mean(1)
            expected = [i for i in sorted(range(N_IMAGES), key=lambda i: (-scores[i], i))
                        if scores[i] > 0][:3]
            assert top[name][0].tolist() == expected
            np.testing.assert_allclose(top[name][1], scores[expected].numpy(), rtol=1e-6)
    assert explorer.top_images(2) is explorer.top_images(2)  # computed once per concept
    assert explorer.top_images(2)["a"][0].tolist() == [1, 4]
    # the analysis module's ranking agrees where scores are positive and distinct
    released = analysis.top_images(codes["a"], T, [2], 2)[0].tolist()
    assert released == [1, 4]


def test_shared_ranking_shows_the_same_images_for_every_model(codes, photos):
    shared = ex.ConceptExplorer(codes, photos, analysis.concept_statistics(codes), top_n=3,
                                shared_ranking=True)
    top = shared.top_images(7)
    assert top["a"][0].tolist() == top["b"][0].tolist() == top["c"][0].tolist() == [1]
    assert top["c"][1].tolist() == [0.0]  # model c's own score on that image


def test_statistics_rows_equal_direct_computations(explorer, dense):
    firing = {n: (z > 0.1).numpy() for n, z in dense.items()}
    both = np.logical_and.reduce(list(firing.values()))
    for concept in (2, 5, 7, 11):
        info = explorer.concept_info(concept)
        fires = np.array([firing[n][:, concept].sum() for n in NAMES])
        p = fires / fires.sum()
        entropy = -sum(x * np.log(x) for x in p if x > 0) / np.log(3)
        assert info["concept"] == concept and info["cofires"] == both[:, concept].sum()
        assert info["firing_entropy"] == pytest.approx(entropy, abs=1e-9)
        assert info["energy"] == pytest.approx(sum(dense[n][:, concept].double().mean()
                                                   for n in NAMES))
        for row, name, count in zip(info["models"], NAMES, fires):
            assert row["model"] == name and row["fires"] == count
            assert row["energy"] == pytest.approx(dense[name][:, concept].double().mean().item())
            assert row["cofire_proportion"] == pytest.approx(both[:, concept].sum() / count
                                                             if count else 0.0)
    assert explorer.concept_info(2)["energy_rank"] == 0
    assert explorer.concept_info(5)["firing_entropy"] == 0.0
    assert explorer.concept_info(2)["firing_entropy"] == pytest.approx(1.0)


def test_image_concepts_lists_planted_concepts_and_marks_shared_ones(explorer):
    found = explorer.image_concepts(1, top=8)
    listed = {n: [c for c, _ in pairs] for n, pairs in found.per_model.items()}
    assert listed["a"][:2] == [2, 7] and listed["b"][:2] == [2, 7] and listed["c"][0] == 2
    assert 7 not in listed["c"]
    assert found.shared[2] == ["a", "b", "c"] and found.shared[7] == ["a", "b"]
    means = dict(found.per_model["a"])
    assert means[2] == pytest.approx(4.0 / T) and means[7] == pytest.approx(3.0 / T)
    unique = explorer.image_concepts(2)
    assert unique.per_model["a"][0][0] == 5 and 5 not in unique.shared
    assert all(5 not in [c for c, _ in unique.per_model[n]] for n in ("b", "c"))


# ---- figures -----------------------------------------------------------------------------------


def test_plot_concept_grid_and_plot_image_concepts_return_figures(explorer, photos):
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    overlays = {2: {"a": [rgb] * 3, "b": [rgb] * 2, "c": [rgb]}, 7: {"a": [rgb], "b": []}}
    figure = ex.plot_concept_grid(overlays, titles={2: "universal"},
                                  captions={(2, "a"): ["x", "y", "z"]})
    assert isinstance(figure, Figure) and len(figure.axes) == 2 * 3 * 3
    assert figs.text_overlaps(figure) == []
    assert len(ex.figure_png(figure)) > 1000  # it draws
    assert figure._repr_png_().startswith(b"\x89PNG")  # Jupyter shows it without pyplot
    found = explorer.image_concepts(1)
    image_figure = ex.plot_image_concepts(photos[1], found, title="image 1")
    assert isinstance(image_figure, Figure) and len(image_figure.axes) == len(NAMES) + 1
    assert figs.text_overlaps(image_figure) == []
    ex.figure_png(image_figure)


def test_static_view_returns_the_default_concepts_figure(explorer):
    figure = explorer.static_view(show_table=False)
    assert isinstance(figure, Figure) and figs.text_overlaps(figure) == []
    widest = max(len(v[0]) for v in explorer.top_images(2).values())
    assert len(figure.axes) == len(NAMES) * widest == 6  # concept 2: two images per model
    assert "concept 2" in figure.subfigs[0]._suptitle.get_text()
    html = explorer.stats_html(2)
    assert html.count("<tr>") == len(NAMES) + 1 and "firing entropy" in html
    assert len(explorer.static_view(7, show_table=True).axes) == 3  # no IPython: no table


# ---- widgets -----------------------------------------------------------------------------------


def test_widget_controls_re_render_the_outputs(explorer):
    pytest.importorskip("ipywidgets")
    tabs = explorer.widget()
    c = explorer.controls
    assert len(tabs.children) == 2 and c.concept.value == 2 and c.rank.value == 0

    def changed(output, action) -> None:
        output.outputs = ()
        action()
        kinds = [set(item["data"]) for item in output.outputs]
        assert any("image/png" in k for k in kinds)

    changed(c.concept_view, lambda: setattr(c.concept, "value", 7))
    assert c.rank.value == explorer.concept_order().tolist().index(7)
    changed(c.concept_view, lambda: setattr(c.rank, "value", 2))
    assert c.concept.value == explorer.concept_order()[2]
    shown = c.concept_view.outputs
    for key in [*list(ex.SORT_KEYS)[1:], "energy"]:  # each a change from the last
        current = c.concept.value
        c.sort.value = key
        assert c.concept.value == current  # the concept stays, its rank follows the order
        assert explorer.concept_order(key)[c.rank.value] == current
        assert [v for _, v in c.concept.options] == explorer.concept_order(key).tolist()
        assert c.concept_view.outputs is shown  # same concept: not redrawn
    c.sort.value = "model-unique (low entropy)"
    changed(c.concept_view, lambda: setattr(c.rank, "value", 0))  # its first concept
    assert c.concept.value == 5
    changed(c.concept_view, lambda: setattr(c.count, "value", 1))
    assert all(len(v[0]) <= 1 for v in explorer.top_images(c.concept.value).values())
    changed(c.image_view, lambda: setattr(c.image, "value", 4))
    assert "text/html" in c.concept_view.outputs[0]["data"]


# ---- a cache as the image source ---------------------------------------------------------------


def test_from_cache_on_a_subsampled_synthetic_cache(tmp_path):
    cache = usae_cache.make_synthetic_cache(tmp_path / "cache", {"a": 8, "b": 8}, 4,
                                            tokens_per_image=20, stats_sample=4)
    generator = torch.Generator().manual_seed(0)
    codes = {n: to_sparse(torch.rand(cache.n_tokens, N_CONCEPTS, generator=generator))
             for n in cache.names}
    explorer = ex.ConceptExplorer.from_cache(cache, codes, top_n=2)
    assert explorer.tokens_per_image == 20 and explorer.n_images == 4
    images = explorer.images
    assert isinstance(images, ex.CacheImages) and len(images) == 4
    assert images[0].size == (224, 224) and 0 in images.failures  # no file: a placeholder
    maps = explorer.heatmaps(int(explorer.concept_order()[0]), "a", [0, 3])
    assert np.count_nonzero(maps[0]) <= 20  # only the kept positions can be hot
    assert len(explorer.static_view(show_table=False).axes) == 2 * 2
