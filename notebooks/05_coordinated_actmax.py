# %% [markdown]
# # 05 · Coordinated activation maximisation (paper section 4.5, Fig. 8)
#
# For one universal concept, each model gets its own image, optimised through that model's whole
# pipeline (normalisation, backbone, tokens on the shared grid, standardisation, its encoder with
# BatchNorm in eval mode) to maximise the concept's pre-TopK activation. As MaCo, the image is a
# learned Fourier phase under a fixed magnitude spectrum measured on real photographs. If the
# concept is truly shared, the images of different models show the same thing, each in its own
# model's "style".

# %% tags=["parameters"]
# The fields of usae_pipeline.Experiment, e.g. {"preset": "synthetic", "quick": True}; run_all.sh
# passes them all. Left {}: the run folder in $USAE_RUN, else the run this notebook sits in, else
# the default run (results/offline, figures/); README, "Exploring in JupyterLab".
experiment = {}

# %%
import usae_actmax as actmax
import usae_analysis as analysis
import usae_figures as figs
import usae_images
import usae_pipeline as pipeline

exp, caches, model, source = pipeline.open_run(experiment)
figures, quick = exp.figures, exp.quick

# %%
backbones = pipeline.load_backbones(exp) if exp.preset != "synthetic" else {}
val = pipeline.encoded_split(exp, model, caches, "val")
stats = analysis.concept_statistics(val.codes)
entropy = analysis.firing_entropy(stats.fires)
aggregate = analysis.aggregate_energy(analysis.energy(stats.code_sums, stats.n_tokens))
universal = [int(c) for c in analysis.top_concepts(aggregate * (entropy > 0.9), 2 if quick else 4)]
print("concepts (high energy, firing entropy > 0.9):", universal)

# %%
if backbones:
    config = actmax.MacoConfig(steps=6 if quick else 64, crops=1 if quick else 3)
    train_images = caches["train"].images
    photos = [usae_images.open_image(train_images.absolute(i)).image
              for i in range(min(len(train_images), 64))]
    prior = actmax.image_prior([p for p in photos if p is not None], config.image_size)
    results = {concept: actmax.coordinated_maximization(
        model, backbones, concept, prior, config, seed=exp.seed,
        progress=pipeline.progress_bars()) for concept in universal}
    fig = figs.coordinated_actmax(results, caption=source + f"; MaCo-style, {config.steps} "
                                  f"steps, {config.image_size} px.")
    figs.save(fig, figures, "fig8_coordinated_actmax")
    gains = {str(c): {n: r.objective_end - r.objective_start for n, r in results[c].items()}
             for c in universal}
    pipeline.update_metrics(exp, {"actmax_objective_gain": gains})
    print("gain of each model's objective (end - start):", ", ".join(model.names))
    for concept, by_model in gains.items():
        print(f"  concept {concept:>5s}  " + "  ".join(f"{by_model[n]:7.3f}" for n in model.names))
else:
    print("The synthetic preset has no images and no backbones: nothing to optimise.")
