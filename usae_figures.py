"""The paper's quantitative figures (sections 4.2 to 4.4), each beside the paper's numbers, and
the grid of section 4.5's coordinated activation maximisation (Fig. 8).

Every function takes plain numbers (from ``usae_analysis``, ``usae_actmax`` or ``metrics.json``)
and returns a matplotlib Figure; nothing is shown or saved here. ``PAPER`` holds what the paper
reports (usae-spec.md section 7) for the DINOv2 / SigLIP / ViT USAE on ImageNet, so that every
plot can say how our run compares, and with which models.
"""
from __future__ import annotations

import base64
import itertools
import textwrap
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.text import Text

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


# ----------------------------------------------------------------------------------------------
# Layout: wrapped titles, captions under everything, and a check that no two texts overlap

_CHAR_WIDTH_EM = 0.6  # a generous mean glyph width of DejaVu Sans, in units of the font size


def wrap(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_inches`` at ``fontsize`` points."""
    chars = max(12, int(width_inches * 72 / (_CHAR_WIDTH_EM * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def wrapped_title(ax: plt.Axes, text: str, fontsize: float = 9) -> None:
    """An axes title wrapped to the axes' width, so that neighbouring titles never collide."""
    width = ax.get_position().width * ax.figure.get_figwidth()
    ax.set_title(wrap(text, width, fontsize), fontsize=fontsize)


def _drawn(fig: plt.Figure):
    """Lay ``fig`` out and return its renderer (a pyplot-free Figure gets an Agg canvas)."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def add_caption(fig: plt.Figure, text: str, fontsize: float = 8) -> plt.Figure:
    """Put ``text`` under everything already drawn in ``fig``, wrapped to the figure's width."""
    bottom = fig.get_tightbbox(_drawn(fig)).y0  # inches from the figure's bottom
    fig.text(0.01, (bottom - 0.08) / fig.get_figheight(), wrap(text, fig.get_figwidth(), fontsize),
             fontsize=fontsize, ha="left", va="top")
    return fig


def _drawn_texts(fig: plt.Figure) -> list[Text]:
    """Every visible, non-empty text of ``fig``; tick labels only for ticks inside the view."""
    tick_labels, shown = set(), []
    for ax in fig.get_axes():
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = (high - low) * 1e-9
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                for label in (tick.label1, tick.label2):
                    tick_labels.add(id(label))
                    if low - span <= tick.get_loc() <= high + span:
                        shown.append(label)
    shown += [t for t in fig.findobj(Text) if id(t) not in tick_labels]
    return [t for t in shown if t.get_visible() and t.get_text().strip()]


def text_overlaps(fig: plt.Figure, tolerance: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of texts of ``fig`` whose rendered boxes overlap by more than ``tolerance`` pixels
    in both directions (titles, captions, axis and tick labels, legends, annotations).

    Boxes are upright, so a rotated text is judged by the upright box around it: stricter than
    the glyphs themselves, never more lenient.
    """
    renderer = _drawn(fig)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _drawn_texts(fig)]
    overlaps = []
    for (text_a, a), (text_b, b) in itertools.combinations(boxes, 2):
        width = min(a.x1, b.x1) - max(a.x0, b.x0)
        height = min(a.y1, b.y1) - max(a.y0, b.y0)
        if width > tolerance and height > tolerance:
            overlaps.append((text_a, text_b))
    return overlaps


MAX_WIDTH_PX = 2200  # wide photo grids (fig. 4) would otherwise be 3,300 px and 5 MB


def save(fig: plt.Figure, folder: str | Path, name: str, *, show: bool = True) -> Path:
    """Save ``fig`` as ``<folder>/<name>.png`` (at most ``MAX_WIDTH_PX`` wide), show that file
    once in a notebook (unless ``show`` is False), and close the figure.

    Warns when two of its texts overlap (a figure nobody can read is a defect).
    """
    path = Path(folder) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    overlaps = text_overlaps(fig)
    if overlaps:
        warnings.warn(f"{name}: overlapping texts {overlaps[:3]}", stacklevel=2)
    fig.savefig(path, dpi=min(110, MAX_WIDTH_PX / fig.get_figwidth()), bbox_inches="tight")
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        get_ipython = None
    if show and get_ipython is not None and get_ipython() is not None:
        display(Image(filename=str(path)))  # the saved bytes, not a second rendering
    plt.close(fig)
    return path


def show_widget(widget, png: str | Path, text: str) -> None:
    """Display an ipywidget with the image ``png`` in the same output, and ``text`` as its
    plain-text form (not the widget's repr, ``Tab(children=(VBox(...``).

    JupyterLab with a kernel draws the widget. A notebook read without one (GitHub, nbviewer,
    nbconvert) has no widget state (``run_all.sh`` drops it), so these viewers fall back to the
    image; so does JupyterLab, since ``run_all.sh`` also drops the dead widget view.
    """
    from IPython.display import display

    bundle = widget._repr_mimebundle_()
    bundle.update({"image/png": base64.b64encode(Path(png).read_bytes()).decode("ascii"),
                   "text/plain": text})
    display(bundle, raw=True)


def r2_matrix(matrix: Sequence[Sequence[float]], names: Sequence[str], *, title: str,
              caption: str, baseline: Sequence[Sequence[float]] | None = None) -> plt.Figure:
    """Fig. 5: the cross-model R^2 heatmap, rows = encoder (source), columns = decoder.

    ``baseline`` (same shape, e.g. an untrained USAE's) is printed under each value."""
    fig, ax = plt.subplots(figsize=(2.8 + 1.7 * len(names), 1.6 + 1.0 * len(names)),
                           layout="constrained")
    values = np.asarray(matrix)
    labels = np.vectorize(lambda v: f"{v:.2f}")(values) if baseline is None else np.vectorize(
        lambda v, b: f"{v:.2f}\nrandom {b:.2f}")(values, np.asarray(baseline))
    sns.heatmap(values, annot=labels, fmt="", cmap="viridis", vmin=0, vmax=1,
                xticklabels=names, yticklabels=names, ax=ax, cbar_kws={"label": "R²"})
    # Horizontal labels: text_overlaps compares upright boxes, and they read best anyway.
    ax.set_xticklabels(names, rotation=0, fontsize=8)
    ax.set_yticklabels(names, rotation=0, fontsize=8)
    ax.set_xlabel("decoded into (target)")
    ax.set_ylabel("encoded from (source)")
    ax.set_title(title, fontsize=10)
    return add_caption(fig, caption)


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
    return add_caption(fig, caption)


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
    fig, ax = plt.subplots(figsize=(6, 3.4), layout="constrained")
    ax.hist(entropy, bins=30, range=(0, 1), color="#4c72b0")
    for share in range(2, n_models + 1):  # a concept firing equally in `share` of the models
        ax.axvline(np.log(share) / np.log(n_models), color="grey", ls=":", lw=1)
    ax.set_xlabel("firing entropy (1: fires equally in every model)")
    ax.set_ylabel("concepts")
    wrapped_title(ax, f"Firing entropy (paper: {PAPER['firing_entropy_peaks']})")
    return add_caption(fig, caption)


def cofire_proportion_curves(proportions: Mapping[str, Sequence[float]], *, caption: str,
                             chance: Mapping[str, Sequence[float]] | None = None) -> plt.Figure:
    """Fig. 6b: each model's co-fire proportion against concept rank (top concepts by energy),
    and, dashed, the chance level of independent firing at the same rates."""
    fig, ax = plt.subplots(figsize=(6, 3.4), layout="constrained")
    means = []
    for name, values in proportions.items():
        line, = ax.plot(np.sort(np.asarray(values))[::-1],
                        label=f"{name} (mean {np.mean(values):.3f})")
        means.append(np.mean(values))
        if chance is not None:
            ax.plot(np.sort(np.asarray(chance[name]))[::-1], ls="--", lw=1, color=line.get_color(),
                    label=f"chance, independent firing (mean {np.mean(chance[name]):.3f})")
    paper = PAPER["cofire_proportion_top1000"]
    ax.set_xlabel("concept rank (sorted by co-fire proportion)")
    ax.set_ylabel("co-fire proportion")
    wrapped_title(ax, f"Co-fire proportion, ours overall {np.mean(means):.3f}; paper overall "
                      f"{paper['overall']} (SigLIP {paper['SigLIP']}, DinoV2 {paper['DinoV2']}, "
                      f"ViT {paper['ViT']})", fontsize=8)
    ax.legend(fontsize=7)
    return add_caption(fig, caption)


def energy_vs_cofires(cofires: Sequence[float], energy: Sequence[float], fits: Mapping,
                      *, caption: str) -> plt.Figure:
    """Fig. 6c: aggregated energy / M against co-fire count (log-log), all and >= 1,000."""
    x, y = np.asarray(cofires, float), np.asarray(energy, float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
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
        wrapped_title(ax, f"{label}: ours {ours}; paper r={paper['r' + key]}, "
                          f"slope={paper['slope' + key]}", fontsize=8)
    return add_caption(fig, caption)


def consistency_histograms(cosines: Mapping[str, Sequence[float]],
                           baseline: Mapping[str, Sequence[float]], *, title: str,
                           caption: str) -> plt.Figure:
    """Fig. 7: matched cosine between USAE and independent-SAE concepts, and the random
    baseline, per model."""
    fig, axes = plt.subplots(1, len(cosines), figsize=(4.2 * len(cosines), 3.4), squeeze=False,
                             layout="constrained")
    for ax, (name, values) in zip(axes[0], cosines.items()):
        ax.hist(baseline[name], bins=40, range=(-0.2, 1), alpha=0.6, label="random baseline",
                color="grey")
        ax.hist(values, bins=40, range=(-0.2, 1), alpha=0.7, label="USAE vs independent")
        ax.axvline(0.5, color="black", ls=":", lw=1)
        share, chance = (float(np.mean(np.asarray(v) > 0.5)) for v in (values, baseline[name]))
        wrapped_title(ax, f"{name}: {share:.0%} of concepts with cosine > 0.5 "
                          f"(random {chance:.0%})")
        ax.set_xlabel("matched cosine")
        ax.legend(fontsize=7)
    fig.suptitle(wrap(title, fig.get_figwidth(), 9), fontsize=9)
    return add_caption(fig, caption)


def coordinated_actmax(results: Mapping[int, Mapping[str, object]], *,
                       caption: str) -> plt.Figure:
    """Fig. 8: one row per concept, one column per model, each model's image for the concept.

    Parameters
    ----------
    results : mapping of int to mapping of str to ActMaxResult
        Concept -> model name -> what ``usae_actmax.coordinated_maximization`` returns for it
        (``image``: 3 x H x W in [0, 1], ``objective_start``, ``objective_end``); every concept
        with the same models, in the same order (the columns).
    caption : str
        Put under the grid.
    """
    models = {concept: list(by_model) for concept, by_model in results.items()}
    names = next(iter(models.values()), [])
    if not names or any(row != names for row in models.values()):
        raise ValueError(f"results must give every concept the same models, in one order, got "
                         f"{models}.")
    fig, axes = plt.subplots(len(results), len(names), layout="constrained",
                             figsize=(3 * len(names), 3 * len(results)), squeeze=False)
    for row, (concept, by_model) in enumerate(results.items()):
        for col, name in enumerate(names):
            result = by_model[name]
            axes[row, col].imshow(np.moveaxis(np.asarray(result.image), 0, -1))  # HWC to show
            wrapped_title(axes[row, col], f"concept {concept} · {name}\nobjective "
                          f"{result.objective_start:.2f} → {result.objective_end:.2f}", 8)
            axes[row, col].axis("off")
    return add_caption(fig, caption)


def training_curves(history: Sequence[Mapping], names: Sequence[str], *, caption: str,
                    independent: Mapping[str, Sequence[Mapping]] | None = None) -> plt.Figure:
    """Did training learn? Loss, training-batch R^2, dead concepts and dictionary movement.

    ``history`` is a run's history (``TrainResult.history`` or the checkpoint's; empty for a USAE
    imported with ``--checkpoint``, whose panels then say so); ``independent`` adds each
    independent SAE's dictionary movement, dotted.
    """
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.6), layout="constrained")
    steps = [row["step"] for row in history]
    colours = dict(zip(names, sns.color_palette(n_colors=len(names))))
    axes[0, 0].plot(steps, [row["loss"] for row in history], color="black")
    if history:  # a log axis without data only warns
        axes[0, 0].set_yscale("log")
    axes[0, 0].set_ylabel("loss (sum over targets)")
    wrapped_title(axes[0, 0], "training loss")

    def series(key, source, target=None):
        points = [(row["step"], row[key][source] if target is None else row[key][source][target])
                  for row in history if source in row.get(key, {})]
        return zip(*points) if points else ((), ())

    for name in names:
        axes[0, 1].plot(*series("r2", name, name), color=colours[name], label=f"{name} (self)")
        others = [n for n in names if n != name]
        cross = [(row["step"], np.mean([row["r2"][o][name] for o in others if o in row["r2"]]))
                 for row in history if any(o in row.get("r2", {}) for o in others)]
        if cross:
            axes[0, 1].plot(*zip(*cross), color=colours[name], ls="--",
                            label=f"{name} (from the others)")
        axes[1, 0].plot(*series("dead_fraction", name), color=colours[name], label=name)
        axes[1, 1].plot(*series("dictionary_cosine_to_init", name), color=colours[name],
                        label=f"{name} (USAE)")
        if independent and name in independent:
            axes[1, 1].plot(*zip(*[(row["step"], row["dictionary_cosine_to_init"][name])
                                   for row in independent[name]]),
                            color=colours[name], ls=":", label=f"{name} (independent SAE)")
    axes[0, 1].set_ylim(min(-0.05, axes[0, 1].get_ylim()[0]), 1)
    axes[0, 1].set_ylabel("R² (paper form)")
    wrapped_title(axes[0, 1], "training-batch R²: decoded into each model, from itself (solid) "
                              "and from the other models (dashed)")
    axes[1, 0].set_ylabel("share of concepts")
    wrapped_title(axes[1, 0], "concepts that never fired in the log interval (per source model)")
    axes[1, 1].set_ylim(-0.05, 1.05)
    axes[1, 1].set_ylabel("median cosine of a row to its initial row")
    wrapped_title(axes[1, 1], "dictionary movement (1: still where it started)")
    for ax in axes.flat:
        ax.set_xlabel("step")
    if not history:  # an imported USAE: nothing to draw, and no made-up curve either
        for ax in (axes[0, 0], axes[0, 1], axes[1, 0]):
            ax.text(0.5, 0.5, "no USAE training history:\nimported, not trained here",
                    ha="center", va="center", transform=ax.transAxes, color="0.4")
    for ax in (axes[0, 1], axes[1, 0], axes[1, 1]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return add_caption(fig, caption)
