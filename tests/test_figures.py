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
        "cofire": figs.cofire_proportion_curves({"a": generator.random(50)}, caption="c",
                                                chance={"a": generator.random(50) * 0.1}),
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
        "curves": figs.training_curves(_history(["a", "b", "c"]), ["a", "b", "c"], caption="c",
                                       independent={"a": _history(["a"])}),
    }
    assert len(made["energy"].axes) == 2
    for name, fig in made.items():
        assert figs.text_overlaps(fig) == [], name
        path = figs.save(fig, tmp_path, name)
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 2000


def test_training_curves_of_an_imported_usae_say_so_and_draw_no_usae_curve(tmp_path):
    """A USAE imported with --checkpoint has no history: only the independent SAEs' curves."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no artists with labels" or log-axis warnings
        fig = figs.training_curves([], ["a", "b"], caption="imported, not trained here",
                                   independent={n: _history([n]) for n in "ab"})
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("no USAE training history:\nimported, not trained here") == 3
    assert all(len(line.get_xdata()) == 0 for ax in fig.axes[:3] for line in ax.lines)
    assert sum(len(line.get_xdata()) > 0 for line in fig.axes[3].lines) == 2  # independent SAEs
    assert figs.text_overlaps(fig) == []
    assert figs.save(fig, tmp_path, "curves").stat().st_size > 2000


def _history(names, steps=(0, 50, 100, 150)):
    """A training history as ``usae_core.Trainer`` records it."""
    return [{"step": step, "loss": 3.0 / (1 + step), "lr": 1e-3,
             "loss_by_target": {n: 1.0 / (1 + step) for n in names},
             "r2": {s: {t: step / 200 for t in names} for s in names},
             "dead_fraction": {n: 0.5 / (1 + step) for n in names},
             "dictionary_cosine_to_init": {n: 1 - step / 400 for n in names}} for step in steps]


LONG = ("a long caption that says where the numbers come from, which models, how many images, "
        "and what the paper reports beside them, long enough to need three lines ") * 2


@pytest.mark.parametrize("make", [
    lambda: figs.r2_matrix(np.random.default_rng(0).random((3, 3)),
                           ["dinov2_imgfocus_block9", "mobilenetv2_deepsort",
                            "efficientnet_lite0"], title="paper-form R² " * 4, caption=LONG),
    lambda: figs.firing_entropy_histogram(np.random.default_rng(0).random(500), 3, caption=LONG),
    lambda: figs.cofire_proportion_curves({n: np.random.default_rng(0).random(80)
                                           for n in "abc"}, caption=LONG),
    lambda: figs.consistency_histograms({n: np.random.default_rng(0).random(30) for n in "abc"},
                                        {n: np.random.default_rng(1).random(30) for n in "abc"},
                                        title="consistency with independent SAEs " * 3,
                                        caption=LONG),
    lambda: figs.training_curves(_history(["dinov2_imgfocus_block9", "mobilenetv2_deepsort",
                                           "efficientnet_lite0"]),
                                 ["dinov2_imgfocus_block9", "mobilenetv2_deepsort",
                                  "efficientnet_lite0"], caption=LONG),
    lambda: figs.r2_matrix(np.random.default_rng(0).random((3, 3)), ["a", "b", "c"], title="t",
                           caption=LONG, baseline=np.random.default_rng(1).random((3, 3)) - 0.5),
], ids=["r2", "entropy", "cofire", "consistency", "curves", "r2_baseline"])
def test_long_titles_and_captions_never_overlap(make):
    assert figs.text_overlaps(make()) == []


def test_text_overlaps_finds_a_caption_on_an_axis_label():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xlabel("an axis label")
    label = ax.xaxis.label
    fig.canvas.draw()
    box = label.get_window_extent(fig.canvas.get_renderer())
    x, y = fig.transFigure.inverted().transform((box.x0, box.y0))
    fig.text(x, y, "a caption drawn on top of it")
    assert ("an axis label", "a caption drawn on top of it") in figs.text_overlaps(fig)
    plt.close(fig)


def test_r2_matrix_prints_the_baseline_under_every_value():
    fig = figs.r2_matrix([[0.8, 0.1], [0.2, 0.5]], ["a", "b"], title="t", caption="c",
                         baseline=[[0.01, -0.2], [0.0, 0.03]])
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert texts == {"0.80\nrandom 0.01", "0.10\nrandom -0.20", "0.20\nrandom 0.00",
                     "0.50\nrandom 0.03"}


def _actmax_results(concepts, names, size=16):
    """What ``usae_actmax.coordinated_maximization`` returns, per concept."""
    import torch

    import usae_actmax as actmax

    generator = torch.Generator().manual_seed(0)
    return {concept: {name: actmax.ActMaxResult(torch.rand(3, size, size, generator=generator),
                                                0.1 * col, 1.0 + col, [0.1 * col, 1.0 + col])
                      for col, name in enumerate(names)} for concept in concepts}


def test_coordinated_actmax_puts_each_concept_on_a_row_and_each_model_in_a_column(tmp_path):
    names = ["dinov2_imgfocus_block9", "mobilenetv2_deepsort", "efficientnet_lite0"]
    results = _actmax_results([7, 3], names)
    fig = figs.coordinated_actmax(results, caption=LONG)
    assert len(fig.axes) == 6
    lefts, tops = {}, {}
    for ax in fig.axes:
        spec = ax.get_subplotspec()
        row, col = spec.rowspan.start, spec.colspan.start
        concept, name = [7, 3][row], names[col]
        result = results[concept][name]
        assert " ".join(ax.get_title().split()) == (
            f"concept {concept} · {name} objective {result.objective_start:.2f} → "
            f"{result.objective_end:.2f}")
        shown = ax.images[0].get_array()
        assert shown.shape == (16, 16, 3)
        np.testing.assert_allclose(shown, result.image.permute(1, 2, 0).numpy())
        assert not ax.axison
        box = ax.get_position()
        lefts.setdefault(col, set()).add(round(box.x0, 3))
        tops.setdefault(row, set()).add(round(box.y1, 3))
    # A grid: one left edge per column and one top per row, columns left to right, rows down.
    assert all(len(v) == 1 for v in (*lefts.values(), *tops.values()))
    assert [lefts[c] for c in range(3)] == sorted(lefts.values(), key=min)
    assert min(tops[0]) > min(tops[1])
    assert any(LONG.split()[0] in t.get_text() for t in fig.texts)  # the caption
    assert figs.text_overlaps(fig) == []
    assert figs.save(fig, tmp_path, "fig8").read_bytes().startswith(b"\x89PNG")


def test_coordinated_actmax_refuses_concepts_with_different_models():
    results = _actmax_results([1, 2], ["a", "b"])
    results[2] = dict(reversed(results[2].items()))
    with pytest.raises(ValueError, match="same models"):
        figs.coordinated_actmax(results, caption="c")
    with pytest.raises(ValueError, match="same models"):
        figs.coordinated_actmax({}, caption="c")


# ---- in a notebook: the saved file shown once, or not at all; a widget with a static image ----


@pytest.fixture
def shown(monkeypatch):
    """What usae_figures displays, as if run in a kernel: a list of (object, options)."""
    import IPython
    import IPython.display

    displayed = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display",
                        lambda obj, **options: displayed.append((obj, options)))
    return displayed


def test_save_shows_the_saved_file_unless_told_not_to(tmp_path, shown):
    from matplotlib.figure import Figure  # not pyplot's: it would hook into the fake kernel

    figs.save(Figure(figsize=(2, 2)), tmp_path, "shown")
    assert len(shown) == 1 and shown[0][0].data == (tmp_path / "shown.png").read_bytes()
    path = figs.save(Figure(figsize=(2, 2)), tmp_path, "silent", show=False)
    assert path.is_file() and len(shown) == 1


def test_show_widget_puts_the_png_beside_the_widget_in_one_output(tmp_path, shown):
    """JupyterLab with a kernel draws the widget; viewers without its state draw the PNG."""
    import base64

    import ipywidgets

    png = tmp_path / "view.png"
    png.write_bytes(b"\x89PNG not really")
    widget = ipywidgets.Tab(children=[ipywidgets.HTML("x")])
    figs.show_widget(widget, png, "the explorer")
    [(bundle, options)] = shown
    assert options == {"raw": True}
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == widget.model_id
    assert base64.b64decode(bundle["image/png"]) == png.read_bytes()
    assert bundle["text/plain"] == "the explorer"  # not "Tab(children=(..."
