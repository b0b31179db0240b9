# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Model-unique concepts (paper section 4.6) and the concept explorer
#
# Not every concept is universal. Concepts with a low firing entropy whose firings all come from
# one model are that model's own: the paper finds DINOv2-only concepts about perspective and
# depth, and SigLIP-only concepts about text. Below they are ranked, with their top images; then
# the explorer lets you browse every concept across models side by side.

# %% tags=["parameters"]
# The fields of usae_pipeline.Experiment to change, e.g. {"preset": "synthetic", "quick": True};
# {} is the default run (results/offline, figures/). run_all.sh passes them all.
experiment = {}

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd().parent))  # the repository root, where the modules live

import usae_analysis as analysis
import usae_explorer as explorer_lib
import usae_figures as figs
import usae_pipeline as pipeline

exp, caches, model, source = pipeline.open_run(experiment)

# %%
val = pipeline.encoded_split(exp, model, caches, "val")
stats = analysis.concept_statistics(val.codes)
unique = analysis.model_unique_concepts(stats.fires, model.names, min_fires=5)
by_model = {name: [u for u in unique if u.model == name] for name in model.names}
for name, found in by_model.items():
    print(f"{name}: {len(found)} unique concepts;", [(u.concept, u.fires) for u in found[:8]])
pipeline.update_metrics(exp, {"unique_concepts": {name: [u.concept for u in found]
                                                  for name, found in by_model.items()}})

# %%
explorer = explorer_lib.ConceptExplorer.from_cache(caches["val"], val.codes, model=model,
                                                   stats=stats, top_n=4)
shown = [found[0].concept for found in by_model.values() if found][:3]
if exp.preset == "synthetic":
    print("The synthetic preset has no images: nothing to show here.")
elif shown:
    fig = explorer.concept_figure(shown)
    figs.add_caption(fig, source + "; one model-unique concept per model (most fired first).")
    figs.save(fig, exp.figures, "fig11_12_model_unique_concepts")
else:
    print("No concept fires in one model only at this size.")

# %% [markdown]
# ## The concept explorer
#
# Three tabs. **Concept**: pick a concept by rank, by id (type it) or from the dropdown, sorted
# by energy, firing entropy or co-fire proportion; each model shows a row of its top images, the
# raw image beside the concept's heatmap on one colour scale shared by all models (the colour
# bar gives it), then each model's activation histogram and the nearest concepts (by co-firing or
# dictionary cosine), which open on a click. **Image**: search images by label or `#index`, pick
# one, see its top concepts per model (coloured by how widely they fire; a click opens the
# concept) and their heatmaps on it. **Translation**: encode the image with model A, decode it
# into model B, and see B's per-patch R². The static view below shows the first concept when the
# notebook is read without a live kernel.

# %%
from IPython.display import display

if exp.preset != "synthetic":
    figs.save(explorer.static_view(), exp.figures, "explorer_static_view")
    display(explorer.widget())
