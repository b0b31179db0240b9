# %% [markdown]
# # 04 · Consistency with independent SAEs (paper section 4.4, Fig. 7 and Fig. 16)
#
# Are the universal concepts also concepts that each model would learn alone? For each model we
# match the USAE dictionary one-to-one to an independently trained TopK SAE's dictionary (same
# core, same tokens) with the Hungarian algorithm on cosine similarity. The paper finds 23–38 %
# of concepts matched with cosine > 0.5, far above a random dictionary (AUC 0.13). The AUC here
# is the area under "share of matches with cosine ≥ t", i.e. the mean clipped cosine (the paper
# does not define it; see usae-spec.md 5.5).

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
figures = exp.figures
saes = pipeline.load_independent(exp)

# %%
usae_dictionaries = {name: model.dictionary(name).detach().cpu() for name in model.names}
independent = {name: saes[name].dictionary(name).detach().cpu() for name in model.names}
matched = analysis.consistency_by_model(usae_dictionaries, independent, seed=exp.seed)
by_model, baselines = matched.summary, matched.baselines
paper = figs.PAPER["consistency_share_gt_0_5"]
fig = figs.consistency_histograms(
    matched.cosines, baselines, title=f"USAE vs independent SAEs (paper: cosine > 0.5 for ViT "
    f"{paper['ViT']:.0%}, DinoV2 {paper['DinoV2']:.0%}, SigLIP {paper['SigLIP']:.0%}; random "
    f"AUC {figs.PAPER['random_baseline_auc']})", caption=source)
figs.save(fig, figures, "fig7_consistency")
print("matched to an independent SAE: share with cosine > 0.5, AUC, random dictionary's AUC")
for name, numbers in by_model.items():
    print(f"  {name:24s} {numbers['share_gt_0_5']:6.1%}  {numbers['auc']:.3f}  "
          f"{numbers['random_baseline_auc']:.3f}")

# %% [markdown]
# ## The most co-firing concepts (Fig. 16)
#
# The same matching, restricted to the 1,000 concepts (or fewer) that co-fire most.

# %%
val = pipeline.encoded_split(exp, model, caches, "val")
stats = analysis.concept_statistics(val.codes)
top = analysis.top_concepts(stats.cofires.double(), min(1000, model.n_concepts // 2))
top_matched = analysis.consistency_by_model(usae_dictionaries, independent, subset=top,
                                           seed=exp.seed)
for name, numbers in top_matched.summary.items():
    by_model[name]["top_cofire_mean_cosine"] = numbers["mean_cosine"]
paper = figs.PAPER["consistency_top1000_mean_cosine"]
fig = figs.consistency_histograms(
    top_matched.cosines, baselines, title=f"The {len(top)} most co-firing concepts (paper mean "
    f"cosine: DinoV2 {paper['DinoV2']}, ViT {paper['ViT']}, SigLIP {paper['SigLIP']})",
    caption=source)
figs.save(fig, figures, "fig16_consistency_top_cofiring")
metrics = pipeline.update_metrics(exp, {"consistency": by_model})
print(f"mean cosine of the matches among the {len(top)} most co-firing concepts")
for name in model.names:
    print(f"  {name:24s} {metrics['consistency'][name]['top_cofire_mean_cosine']:.3f}")
