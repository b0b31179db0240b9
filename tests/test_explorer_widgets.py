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
