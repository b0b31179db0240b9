# %% [markdown]
# # 00 · Data and training
#
# A Universal Sparse Autoencoder learns one concept space shared by several vision models. This
# notebook prepares everything the other notebooks analyse:
#
# 1. the **activation caches**: every model's final-layer tokens on one shared 14×14 grid, for
#    the training images, the held-out validation images and two out-of-distribution stand-ins;
# 2. the **USAE**, trained as in the paper's Fig. 3 (one source model drawn per step, its codes
#    decoded into every model);
# 3. one **independent TopK SAE** per model, same core and same tokens, for section 4.4.
#
# Every step resumes: re-running this notebook reuses finished caches and checkpoints. With
# `checkpoint` (`run_all.sh --checkpoint PATH`: our checkpoint or the authors' released YAML) the
# USAE is not trained: the given one is imported once, its models renamed to this run's, and
# every later notebook analyses it.

# %% tags=["parameters"]
# The fields of usae_pipeline.Experiment, e.g. {"preset": "synthetic", "quick": True}; run_all.sh
# passes them all. Left {}: the run folder in $USAE_RUN, else the run this notebook sits in, else
# the default run (results/offline, figures/); README, "Exploring in JupyterLab".
experiment = {}

# %%
import dataclasses

import usae_origin as origin
import usae_pipeline as pipeline

exp = pipeline.open_experiment(experiment)
for key, value in dataclasses.asdict(exp).items():
    print(f"  {key:20s} {value}")

# %% [markdown]
# ## Activation caches
#
# One fp16 array per model, memory-mapped, row *t* of every array the same image and grid
# position. The standardisation statistics (one scalar mean and std per model, as the released
# code) come from a seeded sample of the training images.

# %%
caches = pipeline.prepare_caches(exp)
for split, cache in caches.items():
    print(f"{split:28s} {len(cache.kept_images):6d} images  {cache.n_tokens:8d} tokens  "
          f"widths {cache.widths}  skipped {cache.metadata['skipped']['count']}")
for name, (mean, std) in caches["train"].standardization.items():
    print(f"standardisation (train) of {name}: mean {mean:.4g}, std {std:.4g}")

# %% [markdown]
# ## The USAE, and one independent SAE per model
#
# The `paper` preset follows the released code (L1 loss with its auxiliary term, raw random
# dictionary rows, only the drawn model's encoder and decoder stepped) with the paper's
# learning-rate schedule. The `offline` preset trains about a thousand times fewer steps, in
# which the released initialisation barely moves; its recipe (unit-norm initial rows, channel
# centring, MSE) was chosen on a split of the training images — see the README. With a
# `checkpoint` no USAE training step runs: the given USAE keeps its own n, k and standardisation.
#
# The independent SAEs (same core, same tokens, same sizes, one model each) are what section 4.4
# compares the USAE's concepts with. On a CPU they train after the USAE, side by side, one
# process per model; every model resumes from its own checkpoint.

# %%
model, saes = pipeline.train_models(exp, caches["train"])
if exp.checkpoint:
    how = f"imported from {exp.checkpoint} (not trained here)"
else:
    steps = origin.training_history(exp.folder / "usae.safetensors")[-1]["step"]
    how = f"trained for {steps} steps"
print(f"USAE over {model.dims} (widths), n={model.n_concepts}, k={model.k}: {how}")
for name, sae in saes.items():
    print(f"independent SAE of {name}: width {sae.dims[name]}, n={sae.n_concepts}, k={sae.k}")

# %% [markdown]
# ## Did training learn?
#
# Before any figure, check that the dictionaries left their random start and that the codes
# reconstruct. The curves come from the history saved with each checkpoint: the loss; the R² of
# the training batches (paper form), decoded into each model from its own codes and from the
# other models' codes; the share of concepts that did not fire at all in a log interval; and the
# median cosine of every dictionary row to its initial row (1: it has not moved; two random
# directions have cosine about 0). An imported USAE has no history here: its panels say so, and
# only the independent SAEs' curves are drawn.

# %%
import usae_figures as figs

history = origin.training_history(exp.folder / "usae.safetensors")
independent_history = {name: origin.training_history(exp.folder / f"sae_{name}.safetensors")
                       for name in model.names}
summary = origin.training_summary(exp)
how = f"imported from {exp.checkpoint}, not trained here" if exp.checkpoint else \
    f"{exp.loss} loss, {exp.dictionary_init} dictionary init, {exp.standardization} " \
    f"standardisation, lr {exp.lr}"
fig = figs.training_curves(history, model.names, independent=independent_history,
                           caption=f"USAE over {exp.backbones} ({exp.preset} preset), "
                           f"n={model.n_concepts}, k={model.k}; {how}; dotted: independent SAEs.")
figs.save(fig, exp.figures, "training_curves")
print("median cosine of the dictionary rows to their initial rows (USAE; independent SAE)")
for name in model.names:
    usae_cosine = (summary["dictionary_cosine_to_init"] or {}).get(name)  # None when imported
    print(f"  {name:24s} {'-' if usae_cosine is None else f'{usae_cosine:.3f}'}; "
          f"{summary['independent_dictionary_cosine_to_init'][name]:.3f}")

# %% [markdown]
# With planted concepts (``--preset synthetic``) we know the truth: how well does each learned
# dictionary recover the planted concept directions (mean best cosine, 1 is perfect)?

# %%
recovery = {}
if exp.preset == "synthetic":
    import usae_synthetic as synthetic

    truth = pipeline.planted_truth(exp)
    recovery = {name: synthetic.best_cosine(truth.views[name], model.dictionary(name).detach())
                .mean().item() for name in model.names}
    for name, cosine in recovery.items():
        print(f"planted concept recovery of {name} (mean best cosine): {cosine:.3f}")

# %%
metrics = pipeline.update_metrics(exp, {
    "models": model.names, "backbones": exp.backbones, "preset": exp.preset,
    "n_concepts": model.n_concepts, "k": model.k, "seed": exp.seed,
    "train_tokens": caches["train"].n_tokens, **summary,
    **({"planted_recovery": recovery} if recovery else {})})
print(f"{exp.folder / 'metrics.json'}: {', '.join(metrics)}")
