# %% [markdown]
# # 06 · Model-unique concepts (paper section 4.6) and the concept explorer
#
# Not every concept is universal. Concepts with a low firing entropy whose firings all come from
# one model are that model's own: the paper finds DINOv2-only concepts about perspective and
# depth, and SigLIP-only concepts about text. Below they are ranked, with their top images; then
# the explorer lets you browse every concept across models side by side.

# %% tags=["parameters"]
# The fields of usae_pipeline.Experiment, e.g. {"preset": "synthetic", "quick": True}; run_all.sh
# passes them all. Left {}: the run folder in $USAE_RUN, else the run this notebook sits in, else
# the default run (results/offline, figures/); README, "Exploring in JupyterLab".
experiment = {}

# %%
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
metrics = pipeline.update_metrics(exp, {"unique_concepts": {
    name: [u.concept for u in found] for name, found in by_model.items()}})

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
# into model B, and see B's per-patch R². Read without a kernel (GitHub, nbviewer), the output
# below is a static image of the first concept, saved as `explorer_static_view.png`; in
# JupyterLab, run the notebook to use the explorer.

# %%
if exp.preset != "synthetic":
    static = figs.save(explorer.static_view(show_table=False), exp.figures,
                       "explorer_static_view", show=False)
    figs.show_widget(explorer.widget(), static, "the concept explorer: run the notebook to use it")
