"""The paper's quantitative figures (sections 4.2 to 4.4), each beside the paper's numbers.

Every function takes plain numbers (from ``usae_analysis`` or ``metrics.json``) and returns a
matplotlib Figure; nothing is shown or saved here. ``PAPER`` holds what the paper reports
(usae-spec.md section 7) for the DINOv2 / SigLIP / ViT USAE on ImageNet, so that every plot can
say how our run compares, and with which models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

PAPER = {
    "models": ["SigLIP", "DinoV2", "ViT"],
    "table1": {  # self-reconstruction, (MSE, R^2) per set
        "SigLIP": {"ImageNet": (0.39, 0.61), "DTD": (0.38, 0.54), "CelebA": (0.48, 0.52)},
        "DinoV2": {"ImageNet": (0.19, 0.77), "DTD": (0.26, 0.69), "CelebA": (0.22, 0.75)},
        "ViT": {"ImageNet": (0.41, 0.59), "DTD": (0.56, 0.46), "CelebA": (0.69, 0.45)},
    },
    "cofire_proportion_top1000": {"SigLIP": 0.344, "DinoV2": 0.266, "ViT": 0.326,
                                  "overall": 0.312},
    "energy_vs_cofire": {"r": 0.63, "slope": 0.23, "r_ge1000": 0.89, "slope_ge1000": 0.70},
    "consistency_share_gt_0_5": {"ViT": 0.38, "DinoV2": 0.26, "SigLIP": 0.23},
    "random_baseline_auc": 0.13,
    "consistency_top1000_mean_cosine": {"DinoV2": 0.65, "ViT": 0.52, "SigLIP": 0.40},
    "firing_entropy_peaks": "modes near 1.0 (about 1,580 concepts) and 0.6 (about 1,140)",
}


def save(fig: plt.Figure, folder: str | Path, name: str) -> Path:
    """Save ``fig`` as ``<folder>/<name>.png``, show it once in a notebook, and close it."""
    path = Path(folder) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(fig)
    plt.close(fig)
    return path


def r2_matrix(matrix: Sequence[Sequence[float]], names: Sequence[str], *, title: str,
              caption: str) -> plt.Figure:
    """Fig. 5: the cross-model R^2 heatmap, rows = encoder (source), columns = decoder."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 1.2 + 1.1 * len(names)))
    sns.heatmap(np.asarray(matrix), annot=True, fmt=".2f", cmap="viridis", vmin=0, vmax=1,
                xticklabels=names, yticklabels=names, ax=ax, cbar_kws={"label": "R²"})
    ax.set_xlabel("decoded into (target)")
    ax.set_ylabel("encoded from (source)")
    ax.set_title(title)
    fig.text(0.01, -0.04, caption, fontsize=8, wrap=True)
    return fig


def reconstruction_table(rows: Sequence[Sequence], header: Sequence[str], *, title: str,
                         caption: str) -> plt.Figure:
    """Table 1 as a figure: one row per model, our numbers beside the paper's."""
    fig, ax = plt.subplots(figsize=(1.4 * len(header), 0.5 + 0.35 * len(rows)))
    ax.axis("off")
    table = ax.table(cellText=[[f"{v:.2f}" if isinstance(v, float) else v for v in row]
                               for row in rows], colLabels=list(header), loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    ax.set_title(title)
    fig.text(0.01, 0.0, caption, fontsize=8, wrap=True)
    return fig


STAND_INS = {"celeba": "CelebA", "dtd": "DTD"}  # split-name fragment -> paper's data set


def table1(names: Sequence[str], val, ood: Mapping[str, object], *,
           with_paper: bool = True) -> tuple[list[str], list[list]]:
    """Table 1's header and rows: self-reconstruction MSE and R^2 (paper form) per model on the
    validation set and each out-of-distribution set, then the paper's rows, column-aligned (a
    split named ``..._celeba_standin`` lines up with the paper's CelebA)."""
    header, rows = ["model", "MSE val", "R² val"], [[n] for n in names]
    paper_sets = ["ImageNet"]
    for split in ood:
        paper_set = next((v for k, v in STAND_INS.items() if k in split), None)
        label = split.replace("ood_", "").split("_")[0]
        header += [f"MSE {label}", f"R² {label}"]
        paper_sets.append(paper_set)
    for i, row in enumerate(rows):
        for reconstruction in (val, *ood.values()):
            row += [reconstruction.mse[i][i], reconstruction.r2_paper[i][i]]
    if with_paper:
        for model in PAPER["models"]:
            row = [f"paper {model}"]
            for paper_set in paper_sets:
                row += list(PAPER["table1"][model][paper_set]) if paper_set else ["–", "–"]
            rows.append(row)
    return header, rows


def firing_entropy_histogram(entropy: Sequence[float], n_models: int, *, caption: str) -> plt.Figure:
    """Fig. 6a: concepts per firing-entropy bin (30 bins on [0, 1])."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(entropy, bins=30, range=(0, 1), color="#4c72b0")
    for share in range(2, n_models + 1):  # a concept firing equally in `share` of the models
        ax.axvline(np.log(share) / np.log(n_models), color="grey", ls=":", lw=1)
    ax.set_xlabel("firing entropy (1: fires equally in every model)")
    ax.set_ylabel("concepts")
    ax.set_title(f"Firing entropy (paper: {PAPER['firing_entropy_peaks']})", fontsize=9)
    fig.text(0.01, -0.06, caption, fontsize=8, wrap=True)
    return fig


def cofire_proportion_curves(proportions: Mapping[str, Sequence[float]], *,
                             caption: str) -> plt.Figure:
    """Fig. 6b: each model's co-fire proportion against concept rank (top concepts by energy)."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    means = []
    for name, values in proportions.items():
        ax.plot(np.sort(np.asarray(values))[::-1], label=f"{name} (mean {np.mean(values):.3f})")
        means.append(np.mean(values))
    paper = PAPER["cofire_proportion_top1000"]
    ax.set_xlabel("concept rank (sorted by co-fire proportion)")
    ax.set_ylabel("co-fire proportion")
    ax.set_title(f"Co-fire proportion, ours overall {np.mean(means):.3f}; paper overall "
                 f"{paper['overall']} (SigLIP {paper['SigLIP']}, DinoV2 {paper['DinoV2']}, "
                 f"ViT {paper['ViT']})", fontsize=8)
    ax.legend(fontsize=8)
    fig.text(0.01, -0.06, caption, fontsize=8, wrap=True)
    return fig


def energy_vs_cofires(cofires: Sequence[float], energy: Sequence[float], fits: Mapping,
                      *, caption: str) -> plt.Figure:
    """Fig. 6c: aggregated energy / M against co-fire count (log-log), all and >= 1,000."""
    x, y = np.asarray(cofires, float), np.asarray(energy, float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    paper = PAPER["energy_vs_cofire"]
    for ax, floor, key in ((axes[0], 1, ""), (axes[1], 1000, "_ge1000")):
        keep = (x >= floor) & (y > 0)
        if keep.any():
            ax.scatter(x[keep], y[keep], s=4, alpha=0.5)
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, f"no concept has >= {floor:,} co-fires\nat this size", ha="center",
                    va="center", transform=ax.transAxes)
        ax.set_xlabel("co-fires")
        ax.set_ylabel("energy / M")
        r, slope = fits.get(f"r{key}"), fits.get(f"slope{key}")
        ours = "too few concepts" if r is None or np.isnan(r) else f"r={r:.2f}, slope={slope:.2f}"
        label = "all concepts" if floor == 1 else "concepts with >= 1,000 co-fires"
        ax.set_title(f"{label}: ours {ours}; paper r={paper['r' + key]}, "
                     f"slope={paper['slope' + key]}", fontsize=8)
    fig.text(0.01, -0.05, caption, fontsize=8, wrap=True)
    return fig


def consistency_histograms(cosines: Mapping[str, Sequence[float]],
                           baseline: Mapping[str, Sequence[float]], *, title: str,
                           caption: str) -> plt.Figure:
    """Fig. 7: matched cosine between USAE and independent-SAE concepts, and the random
    baseline, per model."""
    fig, axes = plt.subplots(1, len(cosines), figsize=(4 * len(cosines), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], cosines.items()):
        ax.hist(baseline[name], bins=40, range=(-0.2, 1), alpha=0.6, label="random baseline",
                color="grey")
        ax.hist(values, bins=40, range=(-0.2, 1), alpha=0.7, label="USAE vs independent")
        ax.axvline(0.5, color="black", ls=":", lw=1)
        share = float(np.mean(np.asarray(values) > 0.5))
        ax.set_title(f"{name}: {share:.0%} of concepts with cosine > 0.5", fontsize=9)
        ax.set_xlabel("matched cosine")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.text(0.01, -0.06, caption, fontsize=8, wrap=True)
    return fig
