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
# # 03 · Universality and importance (paper section 4.3, Fig. 6)
#
# A concept **fires** in a model when its code exceeds τ = 0.1 (the released code's threshold);
# it **co-fires** when every model fires on it at the same image and grid position. The
# **firing entropy** of a concept is 1 when all models fire it equally often and 0 when one model
# does all the firing; the paper finds two modes, at 1 (universal) and near 0.63 (two of three
# models). Important concepts (by **energy**, the mean code) co-fire more.

# %% tags=["parameters"]
# The fields of usae_pipeline.Experiment to change, e.g. {"preset": "synthetic", "quick": True};
# {} is the default run (results/offline, figures/). run_all.sh passes them all.
experiment = {}

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd().parent))  # the repository root, where the modules live

import usae_analysis as analysis
import usae_figures as figs
import usae_pipeline as pipeline

exp, caches, model, source = pipeline.open_run(experiment)

# %%
val = pipeline.encoded_split(exp, model, caches, "val")
stats = analysis.concept_statistics(val.codes)
summary = analysis.universality(stats, analysis.dictionary_norms(model))
fig = figs.firing_entropy_histogram(summary["firing_entropy"], len(model.names), caption=source)
figs.save(fig, exp.figures, "fig6a_firing_entropy")
print("dead concepts:", summary["dead_fraction"])

# %%
aggregate = analysis.aggregate_energy(analysis.energy(stats.code_sums, stats.n_tokens))
top = analysis.top_concepts(aggregate, min(1000, model.n_concepts))
proportion = analysis.cofire_proportion(stats.fires, stats.cofires)
chance = analysis.chance_cofire_proportion(stats.fires, stats.n_tokens)
fig = figs.cofire_proportion_curves({name: proportion[i, top].numpy()
                                     for i, name in enumerate(model.names)},
                                    chance={name: chance[i, top].numpy()
                                            for i, name in enumerate(model.names)},
                                    caption=source + f"; the top {len(top)} concepts by energy.")
figs.save(fig, exp.figures, "fig6b_cofire_proportion")
print("mean co-fire proportion over the top concepts:", summary["cofire_proportion_top1000"])
print("its chance level (independent firing):", summary["cofire_proportion_top1000_chance"])

# %%
fig = figs.energy_vs_cofires(stats.cofires.numpy(), aggregate.numpy() / len(model.names),
                             summary["energy_vs_cofire"], caption=source)
figs.save(fig, exp.figures, "fig6c_energy_vs_cofire")
print(summary["energy_vs_cofire"])

# %%
metrics = pipeline.update_metrics(exp, {key: summary[key] for key in (
    "firing_entropy", "cofire_proportion_top1000", "cofire_proportion_top1000_chance",
    "energy_vs_cofire", "dead_fraction")})
