# %% [markdown]
# # 02 · Reconstruction (paper section 4.2, Fig. 5 and Table 1)
#
# Codes from any model should reconstruct every model. We encode the held-out images with each
# model's encoder and decode them into every model: the diagonal is self-reconstruction, the
# off-diagonal entries are cross-model reconstruction (the paper reports them positive, with the
# diagonal highest). Two R² definitions are shown side by side:
#
# - **R² (paper)**: the paper's and released code's form, with ONE scalar mean over all entries
#   as the baseline;
# - **R² (per dimension)**: explained variance with a per-dimension mean, the stricter form
#   most SAE libraries report.

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
names = val.reconstruction.names
untrained = pipeline.untrained_reconstruction(exp, model, caches, "val")
fig = figs.r2_matrix(val.reconstruction.r2_paper, names, title="Cross-model R² (paper form)",
                     baseline=untrained.r2_paper,
                     caption=source + "; under each value: the same USAE before training.")
figs.save(fig, exp.figures, "fig5_cross_model_r2")
fig = figs.r2_matrix(val.reconstruction.r2_per_dim, names,
                     title="Cross-model R² (per-dimension explained variance)",
                     baseline=untrained.r2_per_dim,
                     caption=source + "; under each value: the same USAE before training.")
figs.save(fig, exp.figures, "fig5_cross_model_r2_per_dim")
print("R² paper form (rows: source, columns: target)")
for name, row in zip(names, val.reconstruction.r2_paper):
    print(f"  {name:24s}", "  ".join(f"{v:6.3f}" for v in row))

# %% [markdown]
# ## Out of distribution (Table 1)
#
# The paper applies its ImageNet-trained USAE unchanged to DTD (textures) and CelebA (faces).
# Neither is reachable offline; **stand-ins**, named as such: scikit-image's texture photos for
# DTD and face photographs for CelebA.

# %%
ood = {split: pipeline.encoded_split(exp, model, caches, split).reconstruction
       for split in caches if split not in ("train", "val")}
header, rows = figs.table1(names, val.reconstruction, ood, with_paper=exp.preset != "synthetic")
fig = figs.reconstruction_table(rows, header, title="Self-reconstruction (Table 1)",
                                caption=source + ". Paper rows: its DINOv2/SigLIP/ViT USAE on "
                                "ImageNet, DTD and CelebA; ours on the stand-ins (faces for "
                                "CelebA, textures for DTD).")
figs.save(fig, exp.figures, "table1_reconstruction")
width = max(len(row[0]) for row in rows)
print(f"{header[0]:{width}s}", "  ".join(f"{cell:>12s}" for cell in header[1:]))
for row in rows:
    print(f"{row[0]:{width}s}", "  ".join(f"{cell:12.3f}" if isinstance(cell, float) else
                                          f"{cell:>12s}" for cell in row[1:]))

# %%
metrics = pipeline.update_metrics(exp, {
    **analysis.reconstruction_metrics(val.reconstruction),
    "ood": {split: analysis.reconstruction_metrics(r) for split, r in ood.items()},
    "untrained": analysis.reconstruction_metrics(untrained),
    "n_tokens": len(val.codes[names[0]])})
print("self-reconstruction: R² paper form, per dimension, MSE (the diagonals in metrics.json)")
for i, name in enumerate(names):
    print(f"  {name:24s} {metrics['r2_paper'][i][i]:6.3f}  {metrics['r2_per_dim'][i][i]:6.3f}  "
          f"{metrics['mse'][i][i]:6.3f}")
