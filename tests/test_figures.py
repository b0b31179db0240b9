"""Tests of usae_figures: tables line up with the paper, every figure renders and saves."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import usae_analysis as analysis  # noqa: E402
import usae_figures as figs  # noqa: E402


def reconstruction(mse, r2):
    return analysis.Reconstruction(["a", "b"], [[r2, 0.1], [0.2, r2 + 0.1]],
                                   [[r2, 0.1], [0.2, r2]], [[mse, 1.0], [1.0, mse + 0.1]])


def test_table1_aligns_each_stand_in_with_the_paper_data_set():
    ood = {"ood_faces_celeba_standin": reconstruction(0.5, 0.4),
           "ood_textures_dtd_standin": reconstruction(0.7, 0.2)}
    header, rows = figs.table1(["a", "b"], reconstruction(0.3, 0.6), ood)
    assert header == ["model", "MSE val", "R² val", "MSE faces", "R² faces", "MSE textures",
                      "R² textures"]
    assert rows[0] == ["a", 0.3, 0.6, 0.5, 0.4, 0.7, 0.2]
    assert rows[1] == ["b", pytest.approx(0.4), pytest.approx(0.7), pytest.approx(0.6),
                       pytest.approx(0.5), pytest.approx(0.8), pytest.approx(0.3)]
    siglip = figs.PAPER["table1"]["SigLIP"]
    assert rows[2] == ["paper SigLIP", *siglip["ImageNet"], *siglip["CelebA"], *siglip["DTD"]]
    assert len(figs.table1(["a", "b"], reconstruction(0.3, 0.6), ood, with_paper=False)[1]) == 2


def test_every_figure_renders_and_saves_a_png(tmp_path):
    generator = np.random.default_rng(0)
    made = {
        "r2": figs.r2_matrix([[0.9, 0.5], [0.4, 0.8]], ["a", "b"], title="t", caption="c"),
        "table": figs.reconstruction_table([["a", 0.1, 0.2]], ["m", "x", "y"], title="t",
                                           caption="c"),
        "entropy": figs.firing_entropy_histogram(generator.random(100), 3, caption="c"),
        "cofire": figs.cofire_proportion_curves({"a": generator.random(50)}, caption="c"),
        "energy": figs.energy_vs_cofires(generator.integers(1, 5000, 200),
                                         generator.random(200), {"r": 0.5, "slope": 0.2,
                                                                 "r_ge1000": 0.8,
                                                                 "slope_ge1000": 0.7},
                                         caption="c"),
        "energy_small": figs.energy_vs_cofires([1, 2, 3], [0.1, 0.2, 0.3],
                                               {"r": None, "slope": None}, caption="c"),
        "consistency": figs.consistency_histograms({"a": generator.random(30)},
                                                   {"a": generator.random(30) * 0.3},
                                                   title="t", caption="c"),
    }
    assert len(made["energy"].axes) == 2
    for name, fig in made.items():
        path = figs.save(fig, tmp_path, name)
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 2000
