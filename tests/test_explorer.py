"""Heatmaps, figures and the concept explorer on hand-made sparse codes with planted concepts."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import usae_analysis as analysis
import usae_cache
import usae_core as core
import usae_explorer as ex
import usae_figures as figs
from conftest import NAMES, N_CONCEPTS, N_IMAGES, T, photo, small_usae, to_sparse

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


def test_concept_hits_equal_torch_nonzero_on_every_concept(codes):
    for model in codes.values():
        for concept in range(N_CONCEPTS):
            token, slot = torch.nonzero(model.indices == concept, as_tuple=True)  # the plain way
            found = ex.concept_hits(model, concept)
            np.testing.assert_array_equal(found.rows, token.numpy())
            np.testing.assert_array_equal(found.values, model.values[token, slot].float().numpy())
            assert found.values.dtype == np.float32


@pytest.mark.parametrize("shared", [False, True])
def test_top_images_from_hits_equal_the_analysis_ranking(codes, photos, shared):
    """The fast path (one pass: the concept's hits) against usae_analysis.top_images, which
    scans the codes again, for every concept and image count, ties included."""
    stats = analysis.concept_statistics(codes)
    for top_n in range(1, N_IMAGES + 2):
        explorer = ex.ConceptExplorer(codes, photos, stats, top_n=top_n, shared_ranking=shared,
                                      include_dead=True)
        for concept in range(N_CONCEPTS):
            groups = [list(NAMES)] if shared else [[n] for n in NAMES]
            for group in groups:
                plain = analysis.top_images([codes[n] for n in group], T, [concept],
                                            top_n)[0].numpy()
                assert explorer.ranked_images(concept, group)[:top_n].tolist() == plain.tolist()
                scores = {n: explorer.heatmaps(concept, n, plain).sum(axis=(1, 2),
                                                                      dtype=np.float64) / T
                          for n in group}
                shown = np.mean(list(scores.values()), axis=0) > 0
                for n in group:
                    chosen, values = explorer.top_images(concept)[n]
                    assert chosen.tolist() == plain[shown].tolist()
                    np.testing.assert_array_equal(values, scores[n][shown])


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
            others = [firing[n][:, concept].mean() for n in NAMES if n != name]
            assert row["cofire_chance"] == pytest.approx(np.prod(others) if count else 0.0)
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


# ---- histograms, nearest concepts, translation ---------------------------------------------------


def test_activation_histograms_count_the_planted_codes(explorer, dense):
    found = explorer.histograms(2, bins=4)
    np.testing.assert_allclose(found.edges, [0, 1, 2, 3, 4])
    assert all(found.counts[n].tolist() == [0, 0, 0, 2] for n in NAMES)
    found = explorer.histograms(12, bins=5)
    for name in NAMES:
        values = dense[name][:, 12].numpy()
        expected = np.histogram(values[values > 0], found.edges)[0]
        assert found.counts[name].tolist() == expected.tolist()
    assert found.edges[-1] == max(dense[n][:, 12].max().item() for n in NAMES)
    empty = ex.activation_histograms({"a": ex.Hits(np.zeros(0, int), np.zeros(0, np.float32))}, 3)
    assert empty.counts["a"].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="bins"):
        ex.activation_histograms({}, 0)


def test_nearest_by_cofiring_is_the_pooled_jaccard_of_firing_tokens(explorer, dense, codes):
    firing = {n: (z > analysis.FIRING_THRESHOLD).numpy() for n, z in dense.items()}
    totals = sum(f.sum(0) for f in firing.values())
    for concept in range(N_CONCEPTS):
        if not totals[concept]:
            continue
        together = sum((f[:, [concept]] & f).sum(0) for f in firing.values())
        together[concept] = 0
        jaccard = together / np.maximum(totals[concept] + totals - together, 1)
        expected = sorted(np.flatnonzero(together), key=lambda d: (-jaccard[d], d))[:8]
        found = explorer.nearest(concept)
        assert [n.concept for n in found] == expected
        np.testing.assert_allclose([n.score for n in found], jaccard[expected])
    # planted: 1 fires on rows 0..9 of both models; 3 on rows 0..1 of a and 0..9 of b, 2 on
    # rows 0..4 of a: pooled, 3 (12 / 20) comes before 2 (5 / 20)
    z = {n: torch.zeros(40, 8) for n in "ab"}
    z["a"][:10, 1] = z["b"][:10, 1] = z["b"][:10, 3] = 1.0
    z["a"][:2, 3] = z["a"][:5, 2] = z["a"][20:30, 4] = 1.0
    planted = {n: to_sparse(v) for n, v in z.items()}
    fires = analysis.concept_statistics(planted).fires.numpy()
    found = ex.nearest_by_cofiring(planted, 1, fires)
    assert [(n.concept, n.together) for n in found] == [(3, 12), (2, 5)]
    assert [n.score for n in found] == [pytest.approx(0.6), pytest.approx(0.25)]


def test_nearest_by_dictionary_cosine_averages_the_models(explorer):
    rng = np.random.default_rng(1)
    dictionaries = {n: torch.from_numpy(rng.normal(size=(N_CONCEPTS, 5 + i)))
                    for i, n in enumerate(NAMES)}
    dictionaries["a"][9] = dictionaries["a"][4] * 3  # same direction in model a only
    unit = {n: d / d.norm(dim=1, keepdim=True) for n, d in dictionaries.items()}
    mean = sum((u @ u[4]).numpy() for u in unit.values()) / len(NAMES)
    expected = sorted((d for d in range(N_CONCEPTS) if d != 4), key=lambda d: (-mean[d], d))[:5]
    found = ex.nearest_by_dictionary(dictionaries, 4, count=5)
    assert [n.concept for n in found] == expected
    np.testing.assert_allclose([n.score for n in found], mean[expected])
    assert found[0].concept == 9 and found[0].score >= 1 / 3
    with pytest.raises(ValueError, match="model="):
        explorer.nearest(4, "dictionary cosine")


def test_translation_r2_equals_a_direct_computation():
    model = small_usae()
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(T, 8, generator=generator), torch.randn(T, 6, generator=generator)
    model.train()
    found = ex.translation_r2(model, "a", "b", a.numpy(), b.numpy())
    assert model.training  # left in the mode it was in
    model.eval()
    with torch.no_grad():
        recon = model.decode("b", model.encode("a", a)).double()
        mean = model.unstandardize("b", torch.zeros(1, 6)).double()
    error = (b.double() - recon).square().sum(1)
    spread = (b.double() - mean).square().sum(1)
    np.testing.assert_allclose(found.r2, (1 - error / spread).numpy(), rtol=1e-6)
    assert found.image_r2 == pytest.approx((1 - error.sum() / spread.sum()).item())
    np.testing.assert_allclose(mean[0].numpy(), model.pairs["b"].act_mean.item()
                               + model.pairs["b"].channel_offset.numpy(), rtol=1e-6)
    own = ex.translation_r2(model, "b", "b", b, b, target_mean=b.mean(0))
    assert own.r2.shape == (T,) and np.isfinite(own.r2).all()
    with pytest.raises(ValueError, match="same tokens"):
        ex.translation_r2(model, "a", "b", a[:5], b)


def test_image_search_by_label_and_index():
    labelled = SimpleImages([photo(i) for i in range(4)], ["dog", "hot dog", "cat", "Dogfish"])
    codes = {n: to_sparse(torch.rand(4 * T, N_CONCEPTS)) for n in "ab"}
    explorer = ex.ConceptExplorer(codes, labelled, analysis.concept_statistics(codes))
    assert explorer.search_images("dog").tolist() == [0, 1, 3]
    assert explorer.search_images("DOG", limit=2).tolist() == [0, 1]
    assert explorer.search_images("#2").tolist() == [2]
    assert explorer.search_images("").tolist() == [0, 1, 2, 3]
    assert explorer.search_images("zebra").tolist() == []


class SimpleImages(list):
    def __init__(self, images, labels):
        super().__init__(images)
        self.labels = labels

    def label(self, index):
        return self.labels[index]


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


def test_a_cache_named_by_backbones_serves_the_usaes_model_names(tmp_path):
    """A cache names models by backbone (``random:a``), a USAE by model key (``random_a``): the
    translation view reads the image's activations under the USAE's names."""
    cache = usae_cache.make_synthetic_cache(tmp_path / "cache", {"random:a": 8, "b": 6}, 3,
                                            tokens_per_image=196, stats_sample=3)
    model = core.USAE({"random_a": 8, "b": 6}, N_CONCEPTS, 3, seed=0)
    model.set_standardization(dict(zip(model.names, cache.standardization.values())))
    codes = {n: to_sparse(torch.rand(cache.n_tokens, N_CONCEPTS)) for n in model.names}
    explorer = ex.ConceptExplorer.from_cache(cache, codes, model=model, top_n=2)
    acts = explorer.activations(1)
    assert list(acts) == ["random_a", "b"]
    assert np.array_equal(acts["random_a"], np.asarray(cache.arrays["random:a"][196:392],
                                                       dtype=np.float32))
    r2_map, translated = explorer.translation_map(1, "random_a", "b")  # under the USAE's names
    assert r2_map.shape == (14, 14) and np.isfinite(translated.image_r2)
