# %% [markdown]
# # 03 · Universality and importance (paper section 4.3, Fig. 6)
#
# A concept **fires** in a model when its code exceeds τ = 0.1 (the released code's threshold);
# it **co-fires** when every model fires on it at the same image and grid position. The
# **firing entropy** of a concept is 1 when all models fire it equally often and 0 when one model
# does all the firing; the paper finds two modes, at 1 (universal) and near 0.63 (two of three
# models). Important concepts (by **energy**, the mean code) co-fire more.

# %% tags=["parameters"]
# The fields of usae_pipeline.Experiment, e.g. {"preset": "synthetic", "quick": True}; run_all.sh
# passes them all. Left {}: the run folder in $USAE_RUN, else the run this notebook sits in, else
# the default run (results/offline, figures/); README, "Exploring in JupyterLab".
experiment = {}

# %%
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
for name, share in summary["dead_fraction"].items():
    print(f"dead concepts, {name}: {share:.1%}")

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
print(f"mean co-fire proportion over the top {len(top)} concepts; chance (independent firing)")
for name in model.names:
    print(f"  {name:24s} {summary['cofire_proportion_top1000'][name]:.3f}; "
          f"{summary['cofire_proportion_top1000_chance'][name]:.3f}")

# %%
fig = figs.energy_vs_cofires(stats.cofires.numpy(), aggregate.numpy() / len(model.names),
                             summary["energy_vs_cofire"], caption=source)
figs.save(fig, exp.figures, "fig6c_energy_vs_cofire")
fit = summary["energy_vs_cofire"]
print(f"energy vs co-fires, log-log: r = {fit['r']:.2f}, slope {fit['slope']:.2f} over "
      f"{fit['n_concepts']} concepts; r = {fit['r_ge1000']:.2f}, slope {fit['slope_ge1000']:.2f} "
      f"over the {fit['n_concepts_ge1000']} with at least 1,000 co-fires")

# %%
metrics = pipeline.update_metrics(exp, {key: summary[key] for key in (
    "firing_entropy", "cofire_proportion_top1000", "cofire_proportion_top1000_chance",
    "energy_vs_cofire", "dead_fraction")})
