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
preset = "offline"  # offline | paper | synthetic
out = "../results/offline"  # caches, checkpoints, codes, metrics.json
figures = "../figures"  # where the PNG figures go
images = None  # a training image folder (offline) or the ImageNet root (paper)
quick = False  # small sizes (CI)
device = "cpu"
seed = 0

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd().parent))  # the repository root, where the modules live

import usae_analysis as analysis
import usae_figures as figs
import usae_pipeline as pipeline

exp, caches, model, source = pipeline.open_run(preset=preset, out=out, images=images,
                                               quick=quick, device=device, seed=seed)

import usae_explorer as explorer_lib

# %%
val = pipeline.encoded_split(exp, model, caches, "val")
explorer = explorer_lib.ConceptExplorer.from_cache(caches["val"], val.codes, model=model,
                                                   top_n=4 if quick else 6, shared_ranking=True)
concepts = [int(c) for c in explorer.concept_order("energy")[:3 if quick else 6]]
print("most important concepts:", concepts)

# %%
if exp.preset == "synthetic":
    print("The synthetic preset has no images: nothing to show here.")
else:
    fig = explorer.concept_figure(concepts)
    figs.add_caption(fig, source)
    figs.save(fig, figures, "fig4_qualitative_concepts")
