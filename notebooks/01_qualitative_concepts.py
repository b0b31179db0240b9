# %% [markdown]
# # 01 · Qualitative concepts (paper section 4.1, Fig. 4)
#
# The most important universal concepts, ranked by energy (the mean code over all tokens, summed
# over models, as the released code). For each concept, the images where it is strongest on
# average over the models (the released demo's ranking) are shown once per model, with that
# model's heatmap of the concept on the 14×14 token grid: a universal concept lights up the same
# regions in every model.

# %% tags=["parameters"]
# The fields of usae_pipeline.Experiment, e.g. {"preset": "synthetic", "quick": True}; run_all.sh
# passes them all. Left {}: the run folder in $USAE_RUN, else the run this notebook sits in, else
# the default run (results/offline, figures/); README, "Exploring in JupyterLab".
experiment = {}

# %%
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
