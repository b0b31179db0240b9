"""Tests of usae_analysis against hand computations, brute force and planted truth."""
import math

import numpy as np
import pytest
import torch

import usae_analysis as analysis
import usae_core as core
import usae_synthetic as synthetic


def random_sparse(tokens, n, k, seed):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.rand(tokens, n, generator=generator).argsort(dim=1)[:, :k]
    values = torch.rand(tokens, k, generator=generator) * 0.4  # about a quarter under tau=0.1
    return analysis.SparseCodes(indices.to(torch.int16), values.half(), n)


# ----------------------------------------------------------------------------------------------
# Reconstruction


def test_r2_and_mse_equal_hand_computations():
    target = torch.tensor([[1.0, 10.0], [3.0, 14.0]])
    recon = torch.tensor([[2.0, 10.0], [3.0, 12.0]])
    # squared errors 1, 0, 0, 4 -> MSE 5/4.
    assert analysis.mse(target, recon) == pytest.approx(1.25)
    # Global scalar mean 7: deviations -6, 3, -4, 7 -> mean square 110/4.
    assert analysis.r2_paper(target, recon) == pytest.approx(1 - 1.25 / (27.5 + 1e-6))
    # Per-dimension means 2 and 12: deviations -1, -2, 1, 2 -> sum of squares 10.
    assert analysis.r2_per_dim(target, recon) == pytest.approx(1 - 5 / 10)


def test_streaming_reconstruction_equals_the_pure_functions():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(300, 7, generator=generator) + torch.arange(7.0)
    recon = target + 0.3 * torch.randn(300, 7, generator=generator)
    accumulator = analysis.ReconstructionAccumulator(7)
    for start in range(0, 300, 64):
        accumulator.update(target[start:start + 64], recon[start:start + 64])
    assert accumulator.mse() == pytest.approx(analysis.mse(target, recon), rel=1e-10)
    assert accumulator.r2_paper() == pytest.approx(analysis.r2_paper(target, recon), rel=1e-10)
    assert accumulator.r2_per_dim() == pytest.approx(analysis.r2_per_dim(target, recon),
                                                     rel=1e-10)
    assert analysis.r2_paper(target, recon) > analysis.r2_per_dim(target, recon)


def test_sparse_codes_round_trip_and_sparse_decode_equals_dense():
    model = core.USAE({"a": 12, "b": 9}, n_concepts=40, k=5, seed=0).eval()
    acts = torch.randn(50, 12)
    with torch.no_grad():
        encoding = model.encode_full("a", acts)
        codes = analysis.to_sparse(encoding, 40)
        assert codes.indices.dtype == torch.int16 and codes.values.dtype == torch.float16
        torch.testing.assert_close(codes.dense(), encoding.codes, atol=2e-3, rtol=1e-3)
        dense = codes.dense() @ model.dictionary("b")
        torch.testing.assert_close(analysis.sparse_decode(codes, model.dictionary("b")), dense,
                                   atol=1e-5, rtol=1e-5)


def test_encode_dataset_matrix_equals_a_direct_computation():
    dims = {"a": 10, "b": 14}
    data = synthetic.planted_concepts(dims, 12, 2, 600, seed=1)
    model = core.USAE(dims, n_concepts=24, k=2, seed=0)
    model.fit_standardization(data.acts)
    batches = [{n: a[i:i + 128] for n, a in data.acts.items()} for i in range(0, 600, 128)]
    result = analysis.encode_dataset(model, batches)
    with torch.no_grad():
        for s, source in enumerate(dims):
            codes = model.encode(source, data.acts[source])
            assert torch.equal(result.codes[source].dense().half(), codes.half())
            for t, target in enumerate(dims):
                x = model.standardize(target, data.acts[target])
                recon = model.decode(target, codes, standardized=True)
                assert result.reconstruction.r2_paper[s][t] == pytest.approx(
                    analysis.r2_paper(x, recon), abs=1e-6)
                assert result.reconstruction.r2_per_dim[s][t] == pytest.approx(
                    analysis.r2_per_dim(x, recon), abs=1e-6)
                assert result.reconstruction.mse[s][t] == pytest.approx(
                    analysis.mse(x, recon), abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Firing, co-firing, energy: brute force on small inputs


def test_concept_statistics_equal_brute_force_dense_computation():
    names = ["a", "b", "c"]
    codes = {name: random_sparse(500, 20, 6, seed) for seed, name in enumerate(names)}
    stats = analysis.concept_statistics(codes, chunk_tokens=97)  # chunks that split nothing nicely
    dense = torch.stack([codes[name].dense() for name in names])  # M x tokens x n
    fired = dense > 0.1
    assert torch.equal(stats.fires, fired.sum(dim=1))
    assert torch.equal(stats.cofires, fired.all(dim=0).sum(dim=0))
    torch.testing.assert_close(stats.code_sums, dense.double().sum(dim=1))
    assert stats.n_tokens == 500
    energy = analysis.energy(stats.code_sums, stats.n_tokens)
    torch.testing.assert_close(energy, dense.double().mean(dim=1))
    torch.testing.assert_close(analysis.energy(stats.code_sums, 500, squared=True), energy ** 2)
    norms = torch.full((20,), 2.0)
    torch.testing.assert_close(analysis.energy(stats.code_sums, 500, norms), 2 * energy)


def test_firing_entropy_and_cofire_proportion_by_hand():
    fires = torch.tensor([[10, 5, 0, 0, 4], [10, 5, 0, 0, 0], [10, 0, 7, 0, 0]])
    entropy = analysis.firing_entropy(fires)
    assert entropy.tolist() == pytest.approx([1.0, math.log(2) / math.log(3), 0.0, 0.0, 0.0])
    cofires = torch.tensor([6, 0, 0, 0, 0])
    proportion = analysis.cofire_proportion(fires, cofires)
    assert proportion[:, 0].tolist() == pytest.approx([0.6, 0.6, 0.6])
    assert proportion[:, 2].tolist() == [0.0, 0.0, 0.0]
    assert analysis.dead_fraction(fires, ["a", "b", "c"]) == {
        "a": 0.4, "b": 0.6, "c": 0.6, "all": 0.2}


def test_chance_cofire_proportion_by_hand_and_under_independent_firing():
    fires = torch.tensor([[10, 5, 0], [20, 5, 3], [40, 0, 7]])
    chance = analysis.chance_cofire_proportion(fires, n_tokens=100)
    assert chance[:, 0].tolist() == pytest.approx([0.2 * 0.4, 0.1 * 0.4, 0.1 * 0.2])
    assert chance[:, 1].tolist() == [0.0, 0.0, 0.0]  # model c never fires concept 1
    assert chance[0, 2] == 0.0  # model a never fires concept 2: no proportion to speak of
    # Three models firing independently at planted rates: the measured proportion is the chance.
    generator = torch.Generator().manual_seed(0)
    rates = torch.tensor([[0.3, 0.1], [0.5, 0.2], [0.4, 0.6]])
    fired = torch.rand(3, 400_000, 2, generator=generator) < rates[:, None, :]
    counts, cofires = fired.sum(dim=1), fired.all(dim=0).sum(dim=0)
    measured = analysis.cofire_proportion(counts, cofires)
    torch.testing.assert_close(measured, analysis.chance_cofire_proportion(counts, 400_000),
                               atol=0.01, rtol=0)


def test_energy_cofire_fit_recovers_a_planted_power_law():
    cofires = torch.logspace(1, 6, 50).round().long()
    aggregate = 3 * 0.02 * cofires.double() ** 0.7  # energy / 3 = 0.02 x cofires^0.7
    aggregate[:3] = 0  # no energy: dropped
    fit = analysis.energy_cofire_fit(aggregate, cofires, n_models=3)
    assert fit.slope == pytest.approx(0.7) and fit.r == pytest.approx(1.0)
    assert fit.n_concepts == 47
    assert analysis.energy_cofire_fit(aggregate, cofires, 3, min_cofires=1000).n_concepts == \
        int((cofires >= 1000).sum())
    flat = analysis.energy_cofire_fit(aggregate, torch.ones_like(cofires), 3)  # no spread: no fit
    assert math.isnan(flat.r) and math.isnan(flat.slope) and flat.n_concepts == 47


def planted_membership(n_per_group):
    """Concept groups: shared by all three, by a and b only, private to a, b, c."""
    groups = [(1, 1, 1), (1, 1, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    rows = [row for row in groups for _ in range(n_per_group)]
    return torch.tensor(rows, dtype=torch.bool), groups


def test_firing_entropy_of_planted_codes_separates_shared_pair_and_private_concepts():
    membership, groups = planted_membership(4)
    dims = {"a": 8, "b": 8, "c": 8}
    data = synthetic.planted_concepts(dims, len(membership), 2, 4000, seed=0,
                                      membership=membership)
    codes = {}
    for column, name in enumerate(dims):
        seen = data.codes * membership[:, column]
        values, indices = seen.topk(2, dim=1)
        codes[name] = analysis.SparseCodes(indices.to(torch.int16), values.half(), 20)
    entropy = analysis.firing_entropy(analysis.concept_statistics(codes).fires)
    expected = {3: 1.0, 2: math.log(2) / math.log(3), 1: 0.0}
    for concept, row in enumerate(membership):
        assert entropy[concept].item() == pytest.approx(expected[int(row.sum())], abs=0.03)


def test_a_usae_trained_on_universal_concepts_finds_them_universal(planted_run):
    """End to end: every planted concept is seen by all models, so the learned concept that
    matches it fires in every model (entropy near 1) and co-fires; the cross matrix is high."""
    model, train_data, held_out = planted_run
    result = analysis.encode_dataset(model, [held_out])
    stats = analysis.concept_statistics(result.codes)
    entropy = analysis.firing_entropy(stats.fires)
    matched = analysis.cosine_matrix(train_data.views["a"], model.dictionary("a")).argmax(dim=1)
    assert entropy[matched].median() > 0.95
    assert analysis.cofire_proportion(stats.fires, stats.cofires)[:, matched].median() > 0.5
    assert min(min(row) for row in result.reconstruction.r2_per_dim) > 0.9
    assert all(row[i] >= max(row) - 0.05 for i, row in enumerate(result.reconstruction.r2_paper))


# ----------------------------------------------------------------------------------------------
# Consistency


def test_hungarian_matching_recovers_a_planted_permutation():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(30, 16, generator=generator)
    permutation = torch.randperm(30, generator=generator)
    b = a[permutation] + 0.05 * torch.randn(30, 16, generator=generator)
    matching = analysis.hungarian_match(a, b)
    assert np.array_equal(matching.rows, np.arange(30))
    assert np.array_equal(permutation[matching.columns].numpy(), np.arange(30))
    assert matching.cosines.min() > 0.98


def test_consistency_of_identical_and_random_dictionaries():
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randn(64, 32, generator=generator)
    same = analysis.consistency(dictionary, dictionary[torch.randperm(64, generator=generator)])
    assert same["share_gt_0_5"] == 1.0 and same["auc"] == pytest.approx(1.0)
    assert same["random_baseline_auc"] < 0.4
    subset = analysis.consistency(dictionary, dictionary, subset=torch.arange(10))
    assert len(subset["cosines"]) == 10 and subset["auc"] == pytest.approx(1.0)


def test_consistency_by_model_finds_a_planted_match_and_the_random_level():
    generator = torch.Generator().manual_seed(0)
    independent = {name: torch.randn(64, 128, generator=generator) for name in ("b", "a")}
    usae = {"b": independent["b"][torch.randperm(64, generator=generator)],  # the same concepts
            "a": torch.randn(64, 128, generator=generator)}  # unrelated concepts
    found = analysis.consistency_by_model(usae, independent, seed=3)
    assert list(found.summary) == list(found.cosines) == list(found.baselines) == ["b", "a"]
    np.testing.assert_allclose(found.cosines["b"], 1.0)
    assert found.summary["b"]["share_gt_0_5"] == 1.0
    # The baseline is a random dictionary like the independent one, matched the same way ...
    for name in usae:
        random_rows = analysis.random_dictionary_like(independent[name], seed=3)
        expected = analysis.hungarian_match(random_rows, independent[name]).cosines
        np.testing.assert_array_equal(found.baselines[name], expected)
        assert found.summary[name]["random_baseline_auc"] == analysis.matching_auc(expected)
        assert set(found.summary[name]) == {"share_gt_0_5", "auc", "mean_cosine",
                                            "random_baseline_auc"}
    # ... and unrelated concepts match no better than it does.
    assert found.summary["a"]["auc"] == pytest.approx(found.summary["a"]["random_baseline_auc"],
                                                      abs=0.05)
    assert found.summary["a"]["share_gt_0_5"] == 0.0
    top = analysis.consistency_by_model(usae, independent, subset=torch.arange(10), seed=3)
    assert all(len(top.cosines[n]) == len(top.baselines[n]) == 10 for n in usae)
    np.testing.assert_allclose(top.cosines["b"], 1.0)


def test_matching_auc_is_the_area_under_the_share_above_threshold_curve():
    cosines = np.array([0.9, 0.4, -0.2, 0.7])
    thresholds = np.linspace(0, 1, 100001)
    area = np.trapezoid([(cosines >= t).mean() for t in thresholds], thresholds)
    assert analysis.matching_auc(cosines) == pytest.approx(area, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Unique concepts, top images, scale


def test_model_unique_concepts_are_the_low_entropy_one_model_ones():
    fires = torch.tensor([[100, 50, 0, 30, 0], [100, 0, 2, 0, 0], [100, 0, 0, 0, 0]])
    unique = analysis.model_unique_concepts(fires, ["a", "b", "c"])
    assert [(u.concept, u.model) for u in unique] == [(1, "a"), (3, "a"), (2, "b")]
    assert unique[0].share == 1.0 and unique[0].firing_entropy == 0.0


def test_top_images_equal_a_dense_ranking():
    codes = random_sparse(40 * 6, 12, 3, seed=3)  # 40 images of 6 tokens
    means = codes.dense().view(40, 6, 12).mean(dim=1)
    torch.testing.assert_close(analysis.image_concept_means(codes, 6), means)
    top = analysis.top_images(codes, 6, concepts=[0, 5, 11], count=4, chunk_images=7)
    for row, concept in enumerate([0, 5, 11]):
        expected = torch.argsort(means[:, concept], descending=True, stable=True)[:4]
        assert means[top[row], concept].tolist() == pytest.approx(
            means[expected, concept].tolist())


def test_image_concept_means_of_chosen_concepts_are_those_columns():
    codes = random_sparse(40 * 6, 12, 3, seed=4)
    full = analysis.image_concept_means(codes, 6)
    for chosen in ([11, 0, 5, 0], list(range(12))[::-1]):  # one pass per concept; one for all
        torch.testing.assert_close(analysis.image_concept_means(codes, 6, chosen), full[:, chosen],
                                   rtol=0, atol=0)
    assert analysis.image_concept_means(codes, 6, []).shape == (40, 0)
    with pytest.raises(IndexError):
        analysis.image_concept_means(codes, 6, [12])


def test_top_images_of_several_models_rank_by_the_mean_over_models():
    a, b = random_sparse(40 * 6, 12, 3, seed=5), random_sparse(40 * 6, 12, 3, seed=6)
    means = (a.dense() + b.dense()).view(40, 6, 12).mean(dim=1) / 2
    top = analysis.top_images([a, b], 6, concepts=[0, 5, 11], count=4, chunk_images=7)
    for row, concept in enumerate([0, 5, 11]):
        expected = torch.argsort(means[:, concept], descending=True, stable=True)[:4]
        assert means[top[row], concept].tolist() == pytest.approx(
            means[expected, concept].tolist())
    torch.testing.assert_close(analysis.top_images([a], 6, [3, 7], 5, chunk_images=9),
                               analysis.top_images(a, 6, [3, 7], 5))
    with pytest.raises(ValueError, match="row-aligned"):
        analysis.top_images([a, a.rows(0, 6 * 39)], 6, [0], 2)


def test_sparse_storage_is_under_one_percent_of_dense_at_paper_sizes():
    ratio = analysis.sparse_storage_ratio(n_concepts=6144, k=32)
    assert ratio == pytest.approx(32 * 4 / (6144 * 4)) and ratio < 0.01
    codes = random_sparse(1000, 6144, 32, seed=0)
    assert codes.nbytes / (1000 * 6144 * 4) == pytest.approx(ratio)
    memory = analysis.analysis_memory_bytes(50_000, 196, 3, 32, 6144)
    assert memory["total"] < 16 * 2 ** 30


def test_write_metrics_gives_strict_json_of_the_analysis_sections(tmp_path, planted_run):
    """The sections the notebooks merge into metrics.json, written as JSON any reader parses:
    NaN and infinity become null, numpy scalars plain numbers, tuples lists."""
    import json

    model, _, held_out = planted_run
    encoded = analysis.encode_dataset(model, [held_out])
    stats = analysis.concept_statistics(encoded.codes)
    metrics = {**analysis.reconstruction_metrics(encoded.reconstruction),
               **analysis.universality(stats, analysis.dictionary_norms(model)),
               "nan": float("nan"), "numpy": np.float32(0.5), "pair": (1, float("inf"))}
    path = tmp_path / "metrics.json"
    analysis.write_metrics(path, metrics)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded["nan"] is None and loaded["numpy"] == 0.5 and loaded["pair"] == [1, None]
    assert np.array(loaded["r2_paper"]).shape == (3, 3)
    assert len(loaded["firing_entropy"]) == 64
    assert set(loaded["energy_vs_cofire"]) >= {"r", "slope", "r_ge1000", "slope_ge1000"}
    assert set(loaded["dead_fraction"]) == {"a", "b", "c", "all"}
