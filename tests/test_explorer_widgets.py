"""usae_explorer_widgets: the three tabs driven as a user would (no browser: the widgets' values
are read back), on the planted codes of conftest."""
from __future__ import annotations

import numpy as np
import pytest

import usae_analysis as analysis
import usae_explorer as ex
from conftest import NAMES, N_IMAGES, T, small_usae



def rendered(explorer) -> str:
    """Every HTML string the three tabs show now."""
    c = explorer.controls
    texts = [c.header.value, c.histograms.value, c.status.value, c.image_header.value,
             c.image_heatmaps.value, c.translation.value]
    texts += [r.value for r in c.rows.children]
    texts += [b.description for b in c.nearest.children if hasattr(b, "description")]
    texts += [b.description for row in c.image_concepts.children
              for b in getattr(row, "children", ()) if hasattr(b, "description")]
    return "".join(texts)


def test_widget_concept_tab_draws_one_row_per_model_on_a_shared_scale(explorer):
    pytest.importorskip("ipywidgets")
    tabs = explorer.widget(image_px=160)
    c = explorer.controls
    assert len(tabs.children) == 3 and c.concept.value == 2 and c.rank.value == 0
    assert c.concept.options[0][0].startswith("2 · rank 0 · energy")  # typing "2" finds it
    assert len(c.rows.children) == len(NAMES)
    for name, row in zip(NAMES, c.rows.children):
        shown = len(explorer.top_images(2)[name][0])
        assert row.value.count("<img") == 2 * shown == 4  # raw image beside its overlay
        assert 'width="160"' in row.value
    assert "usae-colorbar" in c.header.value and ">4<" in c.header.value  # scale 0..4
    assert c.histograms.value.count("<svg") == len(NAMES)
    assert "-0.00" not in rendered(explorer)


def test_widget_model_where_the_concept_never_fires_says_so(explorer):
    pytest.importorskip("ipywidgets")
    explorer.widget()
    c = explorer.controls
    c.concept.value = 5  # fires in model a only
    notes = ["never fires" in r.value for r in c.rows.children]
    assert notes == [False, True, True]
    assert c.rows.children[1].value.count("<img") == 0
    assert c.rows.children[0].value.count("<img") == 2
    text = rendered(explorer)
    assert "-0.00" not in text and "-0" not in text.replace("-0.", "")  # entropy 0, not -0.00


def test_widget_sort_change_re_ranks_and_draws_the_new_top_concept(explorer):
    pytest.importorskip("ipywidgets")
    explorer.widget()
    c = explorer.controls
    c.concept.value = 7
    assert c.rank.value == explorer.concept_order().tolist().index(7)
    c.rank.value = 2
    assert c.concept.value == explorer.concept_order()[2]
    for key in [*list(ex.SORT_KEYS)[1:], "energy"]:  # each a change from the last
        before = c.rows.children
        c.sort.value = key
        top = int(explorer.concept_order(key)[0])
        assert c.concept.value == top and c.rank.value == 0
        assert [v for _, v in c.concept.options] == explorer.concept_order(key).tolist()
        assert c.rows.children is not before  # redrawn
        assert f"concept {top}" in c.header.value
    c.sort.value = "model-unique (low entropy)"
    assert c.concept.value == 5 and "concept 5" in c.header.value
    c.count.value = 1
    assert all(len(v[0]) <= 1 for v in explorer.top_images(5).values())
    assert c.rows.children[0].value.count("<img") == 2


def test_widget_id_search_selects_and_bad_ids_say_why(explorer):
    pytest.importorskip("ipywidgets")
    explorer.widget()
    c = explorer.controls
    c.search.value = "7"
    assert c.concept.value == 7 and "concept 7" in c.header.value and c.status.value == ""
    for text, reason in (("abc", "not a concept id"), ("99", "does not exist"),
                         ("3", "never fires")):
        c.search.value = text
        assert reason in c.status.value and c.concept.value == 7
    with pytest.raises(ValueError, match="0..15"):
        explorer.find_concept("-1")
    assert explorer.find_concept(" #5 ") == 5


def test_widget_nearest_buttons_and_image_tab_concepts_open_the_concept(explorer):
    pytest.importorskip("ipywidgets")
    tabs = explorer.widget()
    c = explorer.controls
    c.concept.value = 7
    first = explorer.nearest(7)[0].concept
    c.nearest.children[0].click()
    assert c.concept.value == first
    c.image_search.value = "#1"
    assert c.image_list.options[0] == ("#1", 1) and c.thumbnails.children
    c.thumbnails.children[0].children[1].click()  # the thumbnail's button picks the image
    assert c.image.value == 1
    assert c.image_header.value.count("<img") == 1
    row_a = c.image_concepts.children[1]  # legend first, then one row per model
    assert [b.description.split(" · ")[0] for b in row_a.children[1:3]] == ["2", "7"]
    tabs.selected_index = 1
    row_a.children[2].click()  # concept 7's button
    assert c.concept.value == 7 and tabs.selected_index == 0
    assert "concept 7" in c.header.value
    # the image's concepts as heatmaps on it: one overlay per model per drawn concept
    assert c.image_heatmaps.value.count("<b>concept ") >= 2
    assert c.image_heatmaps.value.count("<img") == len(NAMES) * \
        c.image_heatmaps.value.count("<b>concept ")
    c.image_search.value = ""  # every image listed again
    c.image_list.value = 4
    assert c.image.value == 4 and "#4" in c.image_header.value
    assert "needs the USAE" in c.translation.value  # no model given
    assert "-0.00" not in rendered(explorer)


def test_widget_translation_tab_maps_per_patch_r2(codes, photos):
    pytest.importorskip("ipywidgets")
    model = small_usae()
    rng = np.random.default_rng(5)
    acts = {n: rng.normal(size=(N_IMAGES * T, d)).astype(np.float32)
            for n, d in model.dims.items()}
    explorer = ex.ConceptExplorer(
        codes, photos, analysis.concept_statistics(codes), top_n=2, model=model,
        activations=lambda i: {n: v[i * T:(i + 1) * T] for n, v in acts.items()})
    grid, result = explorer.translation_map(3, "c", "a")
    direct = ex.translation_r2(model, "c", "a", acts["c"][3 * T:4 * T], acts["a"][3 * T:4 * T])
    np.testing.assert_allclose(grid.reshape(-1), direct.r2)
    explorer.widget()
    c = explorer.controls
    c.image.value = 3
    c.source.value, c.target.value = "c", "a"
    text = c.translation.value
    assert f"image R² <b>{ex._fixed(result.image_r2)}</b>" in text
    assert text.count("<img") == 2 and "usae-colorbar" in text and "-0.00" not in text
    assert "dictionary cosine" in c.nearest_by.options
    c.nearest_by.value = "dictionary cosine"
    assert len(c.nearest.children) == 8
    with pytest.raises(ValueError, match="unknown model"):
        explorer.translation_map(0, "a", "z")


def test_batched_overlays_in_the_views_equal_overlay_one_by_one(explorer):
    """The concept rows and the image tab's heatmaps draw every overlay in one batch: each
    <img> equals the plain path's (overlay of that image and map on its scale, then its tag)."""
    import usae_explorer_widgets as xw

    pictures = xw.Pictures(explorer, 224)
    for concept in (2, 5, 7):
        vmax, maps = xw.concept_scale(explorer, concept)
        rows = xw.concept_rows_html(explorer, concept, pictures, 150, vmax, maps)
        for name, (chosen, _) in explorer.top_images(concept).items():
            for image, heat in zip(chosen, maps[name]):
                plain = ex.overlay(pictures.array(int(image)), heat, 224, vmax=vmax)
                tag = xw.hm.image_tag(plain, width=150, title=f"concept {concept} on #{image}")
                assert tag in rows[name]
    for image in (1, 2, 4):
        concepts = [2, 7, 5, 11]
        text = xw.image_heatmaps_html(explorer, image, concepts, pictures, 120)
        assert text.count("<img") == len(concepts) * len(NAMES)
        for concept in concepts:
            maps = {n: explorer.heatmaps(concept, n, [image])[0] for n in NAMES}
            vmax = max(float(m.max()) for m in maps.values())
            for name, heat in maps.items():
                plain = ex.overlay(pictures.array(image), heat, 224, vmax=vmax)
                assert xw.hm.image_tag(plain, width=120, title=name) in text


def test_widget_updates_run_torch_on_one_thread_and_restore_it(explorer, monkeypatch,
                                                              request):
    pytest.importorskip("ipywidgets")
    import torch

    import usae_explorer_widgets as xw

    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))
    torch.set_num_threads(2)  # as on a two-core machine
    before = torch.get_num_threads()
    seen = []
    heatmaps = explorer.heatmaps
    monkeypatch.setattr(explorer, "heatmaps", lambda *args: (
        seen.append(torch.get_num_threads()), heatmaps(*args))[1])
    explorer.widget()
    c = explorer.controls
    c.concept.value = 7  # an observer
    c.image.value = 4
    c.nearest.children[0].click()  # a button
    assert seen and set(seen) == {1} and torch.get_num_threads() == before
    with pytest.raises(KeyError):
        with xw.one_thread():
            raise KeyError("an update that fails")
    assert torch.get_num_threads() == before


def test_reused_buttons_show_and_open_what_new_ones_would(explorer, codes, photos):
    """The nearest and image-tab buttons are made once and relabelled on each redraw: after
    a walk through concepts and images they read as a freshly built widget's (the plain path)
    and a click opens the concept they show now."""
    pytest.importorskip("ipywidgets")

    def labels(view):
        c = view.controls
        return ([(b.description, b.tooltip) for b in c.nearest.children],
                [[(b.description, b.tooltip, b.style.button_color) for b in row.children[1:]]
                 for row in c.image_concepts.children[1:]])

    explorer.widget()
    walked = explorer.controls
    for concept, image in ((7, 2), (5, 4), (2, 0), (9, 1)):
        walked.concept.value, walked.image.value = concept, image
        fresh = ex.ConceptExplorer(codes, photos, analysis.concept_statistics(codes), top_n=3)
        fresh.widget()
        fresh.controls.concept.value, fresh.controls.image.value = concept, image
        assert labels(explorer) == labels(fresh)
        assert [b.description for b in walked.nearest.children if b.description] == [
            f"{n.concept} · {ex._fixed(n.score)}" for n in explorer.nearest(concept)]
    target = int(walked.image_concepts.children[1].children[1].description.split(" · ")[0])
    walked.image_concepts.children[1].children[1].click()
    assert walked.concept.value == target and f"concept {target}" in walked.header.value
    walked.concept.value = 7  # a concept with neighbours: the reused first button opens its own
    first = explorer.nearest(7)[0].concept
    walked.nearest.children[0].click()
    assert walked.concept.value == first
