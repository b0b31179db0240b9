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
# # 01 · Qualitative concepts (paper section 4.1, Fig. 4)
#
# The most important universal concepts, ranked by energy (the mean code over all tokens, summed
# over models, as the released code). For each concept, the images where it is strongest on
# average over the models (the released demo's ranking) are shown once per model, with that
# model's heatmap of the concept on the 14×14 token grid: a universal concept lights up the same
# regions in every model.

# %% tags=["parameters"]
# The fields of usae_pipeline.Experiment to change, e.g. {"preset": "synthetic", "quick": True};
# {} is the default run (results/offline, figures/). run_all.sh passes them all.
experiment = {}

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd().parent))  # the repository root, where the modules live

import usae_explorer as explorer_lib
import usae_figures as figs
import usae_pipeline as pipeline

exp, caches, model, source = pipeline.open_run(experiment)

# %%
val = pipeline.encoded_split(exp, model, caches, "val")
explorer = explorer_lib.ConceptExplorer.from_cache(caches["val"], val.codes, model=model,
                                                   top_n=4 if exp.quick else 6,
                                                   shared_ranking=True)
concepts = [int(c) for c in explorer.concept_order("energy")[:3 if exp.quick else 6]]
print("most important concepts:", concepts)

# %%
if exp.preset == "synthetic":
    print("The synthetic preset has no images: nothing to show here.")
else:
    fig = explorer.concept_figure(concepts)
    figs.add_caption(fig, source)
    figs.save(fig, exp.figures, "fig4_qualitative_concepts")
