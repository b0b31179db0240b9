"""Concept heatmaps, qualitative figures and an ipywidgets concept explorer (spec 5.7).

Three layers, each usable without the next:

1. **Heatmaps**: a concept's code on each token of an image, placed on the model grid
   (:func:`concept_heatmaps`), upsampled and min-max normalised (:func:`upsample_heatmap`) and
   laid over the image as the models see it (:func:`overlay`), as the released code.
2. **Figures**: :func:`plot_concept_grid` (paper Fig. 4: one concept, every model's top images)
   and :func:`plot_image_concepts` (which concepts fire on one image, per model). They return
   :class:`matplotlib.figure.Figure` objects made without pyplot, so nothing is shown or kept
   alive behind the caller's back: a notebook displays or saves them.
3. **Explorer**: :class:`ConceptExplorer` holds the data (sparse codes, statistics, an image
   source) and the pure logic (concept orderings, top images, statistics, an image's concepts);
   :meth:`ConceptExplorer.widget` only wires ipywidgets to it, and
   :meth:`ConceptExplorer.static_view` gives a figure for executed notebooks without a kernel.

Image indices are *cached* image indices: image ``i`` owns code rows ``i * T .. (i + 1) * T - 1``
(``row // T``); :class:`CacheImages` maps them to files. Imports ``usae_analysis``,
``usae_cache`` (the cache's image list) and ``usae_images`` (decoding).
"""
from __future__ import annotations

import base64
import functools
import html
import io
import sys
from types import SimpleNamespace
from typing import Mapping, NamedTuple, Sequence

import matplotlib
import matplotlib.patches
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

import usae_analysis as analysis
import usae_cache
import usae_images

SORT_KEYS = {  # label -> (statistic, largest first); co-fire proportion: mean over models
    "energy": ("energy", True),
    "firing entropy": ("firing_entropy", True),
    "co-fire proportion": ("cofire_proportion", True),
    "model-unique (low entropy)": ("firing_entropy", False),
}
SHARED_ALL, SHARED_SOME, UNSHARED = "tab:orange", "tab:green", "tab:gray"  # bar colours


# ----------------------------------------------------------------------------------------------
# Heatmaps


def _tokens_per_image(grid: int, positions: np.ndarray | None) -> int:
    return grid * grid if positions is None else int(positions.shape[1])


def concept_heatmaps(codes: analysis.SparseCodes, images: Sequence[int], concept: int, *,
                     grid: int = 14, positions: np.ndarray | None = None) -> np.ndarray:
    """``len(images) x grid x grid`` code of ``concept`` at every grid position of each image.

    Parameters
    ----------
    codes : SparseCodes
        One model's codes, rows grouped by image (``T`` consecutive rows per image).
    images : sequence of int
        Cached image indices.
    concept : int
    grid : int
        Side of the token grid (14 for the paper's models).
    positions : ndarray, optional
        ``n_images x T`` grid position (row-major) of each row, as ``Cache.positions``. ``None``
        means every position is kept, in raster order (``T = grid * grid``). Positions a
        subsampled cache did not keep stay at 0.

    Returns
    -------
    ndarray
        float32 heatmaps.
    """
    tokens = _tokens_per_image(grid, positions)
    n_images = len(codes) // tokens
    images = np.asarray(images, dtype=np.int64).reshape(-1)
    if n_images * tokens != len(codes):
        raise ValueError(f"{len(codes)} code rows is not a whole number of {tokens}-token images.")
    if images.size and (images.min() < 0 or images.max() >= n_images):
        raise IndexError(f"image indices must be in 0..{n_images - 1}.")
    rows = torch.from_numpy(images[:, None] * tokens + np.arange(tokens))
    # TopK indices are distinct within a token, so at most one of the k slots matches.
    hits = codes.indices[rows].long() == concept
    heat = (codes.values[rows].float() * hits).sum(dim=-1).numpy()
    maps = np.zeros((len(images), grid * grid), dtype=np.float32)
    if positions is None:
        maps[:] = heat
    else:
        np.put_along_axis(maps, np.asarray(positions)[images].astype(np.int64), heat, axis=1)
    return maps.reshape(len(images), grid, grid)


def upsample_heatmap(heatmap: np.ndarray, size: int = 224) -> np.ndarray:
    """Bicubic upsampling to ``size x size`` then min-max normalisation to [0, 1].

    torch's bicubic (a = -0.75, half-pixel centres, clamped borders) is the kernel of the
    released code's ``cv2.INTER_CUBIC``. As there, cubic overshoot is kept and absorbed by the
    min-max step; a constant map becomes all zeros. Accepts ``h x w`` or ``n x h x w``.
    """
    heat = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
    single = heat.ndim == 2
    heat = heat.reshape(-1, 1, *heat.shape[-2:])
    heat = F.interpolate(heat, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    heat = heat.numpy()  # the rest in numpy: small tensors pay torch's per-op overhead
    low = heat.min(axis=(1, 2), keepdims=True)
    span = heat.max(axis=(1, 2), keepdims=True) - low
    heat = np.divide(heat - low, span, out=np.zeros_like(heat), where=span > 0)
    return heat[0] if single else heat


def squash(image: Image.Image, size: int = 224) -> np.ndarray:
    """``size x size x 3`` uint8: the image resized without keeping its aspect, as every
    backbone's preprocessing does (spec 1.3), so heatmap cells land on the right pixels."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


def overlay(image: Image.Image, heatmap: np.ndarray, size: int = 224, *, alpha: float = 1.0,
            cmap: str = "viridis") -> np.ndarray:
    """Heatmap over the squashed image: ``size x size x 3`` uint8.

    The heatmap goes through :func:`upsample_heatmap`, then is coloured with ``cmap`` whose
    opacity ramps from 0 (no heat: the image shows unchanged) to ``alpha`` (hottest pixel), as
    overcomplete's ``VIRIDIS_ALPHA`` used by the released code.
    """
    base = squash(image, size).astype(np.float32) / 255
    heat = upsample_heatmap(heatmap, size)
    colours = matplotlib.colormaps[cmap](heat)[..., :3]
    opacity = alpha * heat[..., None]
    mixed = base * (1 - opacity) + colours * opacity
    return np.clip(np.rint(mixed * 255), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# An image's concepts, per model


class ImageConcepts(NamedTuple):
    """The concepts of one image, per model.

    Attributes
    ----------
    image : int
    per_model : dict
        Model name -> list of ``(concept, mean code over the image)``, largest first.
    shared : dict
        Concept -> the models in which it fires on this image (some token's code above the
        firing threshold), for listed concepts that fire in at least two models.
    n_models : int
    """

    image: int
    per_model: dict[str, list[tuple[int, float]]]
    shared: dict[int, list[str]]
    n_models: int


def image_concepts(codes: Mapping[str, analysis.SparseCodes], image: int, tokens_per_image: int,
                   *, top: int = 8, threshold: float = analysis.FIRING_THRESHOLD) -> ImageConcepts:
    """Top concepts of ``image`` in each model, by mean code, and which of them are shared.

    "Shared" asks whether the concept *fires* on this image in another model, not whether it
    made that model's top list: a concept ranked 9th in one model and 11th in another is
    still the same concept seen by both.
    """
    parts = {n: c.rows(image * tokens_per_image, (image + 1) * tokens_per_image)
             for n, c in codes.items()}
    fires = analysis.concept_statistics(parts, threshold=threshold).fires > 0
    per_model = {}
    for name, part in parts.items():
        means = analysis.image_concept_means(part, tokens_per_image)[0]
        per_model[name] = [(int(c), float(means[c])) for c in analysis.top_concepts(means, top)
                           if means[c] > 0]
    listed = sorted({c for pairs in per_model.values() for c, _ in pairs})
    shared = {c: [n for i, n in enumerate(parts) if fires[i, c]] for c in listed}
    return ImageConcepts(image, per_model, {c: m for c, m in shared.items() if len(m) >= 2},
                         len(codes))


# ----------------------------------------------------------------------------------------------
# Figures


class NotebookFigure(Figure):
    """A Figure that Jupyter shows as PNG even when pyplot (and so the inline backend's
    formatter) was never imported: the kernel falls back to ``_repr_png_``."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def plot_concept_grid(overlays: Mapping[int, Mapping[str, Sequence[np.ndarray]]], *,
                      titles: Mapping[int, str] | None = None,
                      subtitles: Mapping[tuple[int, str], str] | None = None,
                      captions: Mapping[tuple[int, str], Sequence[str]] | None = None,
                      panel_size: float = 1.6) -> Figure:
    """Concepts as rows, models as column groups, each group that model's top images.

    Parameters
    ----------
    overlays : mapping
        Concept -> model name -> RGB images (e.g. from :func:`overlay`). Groups may hold fewer
        images than the widest one; their spare panels stay blank.
    titles : mapping, optional
        Row title per concept (default ``concept <id>``).
    subtitles : mapping, optional
        Group header per ``(concept, model)`` (default the model name).
    captions : mapping, optional
        One caption per image per ``(concept, model)``.
    panel_size : float
        Inches per image.

    Returns
    -------
    Figure
        ``concepts x models x images`` axes (blank ones included).
    """
    concepts = list(overlays)
    models = list(dict.fromkeys(m for c in concepts for m in overlays[c]))
    width = max([1] + [len(overlays[c].get(m, ())) for c in concepts for m in models])
    figure = NotebookFigure(figsize=(panel_size * width * len(models) + 0.3 * len(models),
                             (panel_size + 0.7) * len(concepts)), layout="constrained")
    rows = np.atleast_1d(figure.subfigures(len(concepts), 1))
    for concept, row in zip(concepts, rows):
        row.suptitle((titles or {}).get(concept, f"concept {concept}"), fontsize=11,
                     fontweight="bold")
        groups = np.atleast_1d(row.subfigures(1, len(models), wspace=0.02))
        for model, group in zip(models, groups):
            group.suptitle((subtitles or {}).get((concept, model), model), fontsize=9)
            pictures = list(overlays[concept].get(model, ()))
            notes = list((captions or {}).get((concept, model), ()))
            for slot, axis in enumerate(np.atleast_1d(group.subplots(1, width))):
                axis.set_axis_off()
                if slot < len(pictures):
                    axis.imshow(pictures[slot])
                    if slot < len(notes):
                        axis.set_title(notes[slot], fontsize=7)
    return figure


def plot_image_concepts(image: Image.Image, found: ImageConcepts, *, size: int = 224,
                        title: str | None = None) -> Figure:
    """The image, then one bar chart per model of its top concepts (mean code).

    Bars are coloured by how widely the concept fires on this image: in every model, in
    some other models, or in this model only.
    """
    models = list(found.per_model)
    figure = NotebookFigure(figsize=(2.6 * (len(models) + 1), 3.0), layout="constrained")
    axes = figure.subplots(1, len(models) + 1)
    axes[0].imshow(squash(image, size))
    axes[0].set_axis_off()
    axes[0].set_title(title or f"image {found.image}", fontsize=9)
    for name, axis in zip(models, axes[1:]):
        pairs = found.per_model[name]
        colours = [SHARED_ALL if len(found.shared.get(c, ())) == found.n_models
                   else SHARED_SOME if c in found.shared else UNSHARED for c, _ in pairs]
        axis.barh(range(len(pairs)), [v for _, v in pairs], color=colours)
        axis.set_yticks(range(len(pairs)), [str(c) for c, _ in pairs], fontsize=8)
        axis.invert_yaxis()  # best concept on top
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("mean code on image", fontsize=8)
        axis.tick_params(axis="x", labelsize=7)
        axis.spines[["top", "right"]].set_visible(False)
    handles = [matplotlib.patches.Patch(color=c, label=l) for c, l in
               ((SHARED_ALL, "fires in all models"), (SHARED_SOME, "fires in some models"),
                (UNSHARED, "this model only"))]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return figure


# ----------------------------------------------------------------------------------------------
# Image sources: anything with a length and a PIL image per cached index (a list of images
# qualifies); an optional ``label(index) -> str`` is used in captions.


class CacheImages:
    """The images of a :class:`usae_cache.Cache`, by cached image index (``row // T``).

    Files are decoded with :func:`usae_images.open_image`; one that cannot be read (or a
    synthetic cache's, which has no files) gives a grey placeholder, so browsing never stops
    on a bad file. The ``keep`` most recently used images are kept in memory.
    """

    def __init__(self, cache: usae_cache.Cache, *, keep: int = 64):
        self.images = cache.images
        self.kept = np.asarray(cache.kept_images)
        self.failures: dict[int, str] = {}
        self._decoded = functools.lru_cache(maxsize=keep)(self._decode)

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> Image.Image:
        return self._decoded(int(index))

    def _decode(self, index: int) -> Image.Image:
        opened = usae_images.open_image(self.images.absolute(int(self.kept[index])))
        if opened.image is None:
            self.failures[index] = opened.reason
            return Image.new("RGB", (224, 224), (128, 128, 128))
        return opened.image

    def label(self, index: int) -> str:
        return self.images.labels[int(self.kept[index])]


def _label(images: Sequence[Image.Image], index: int) -> str:
    name = images.label(index) if hasattr(images, "label") else ""
    return f"#{index} {name}".strip()


# ----------------------------------------------------------------------------------------------
# Explorer


class ConceptExplorer:
    """Browse concepts across models: top images with heatmaps, statistics, an image's concepts.

    Parameters
    ----------
    codes : mapping
        Model name -> :class:`usae_analysis.SparseCodes`, each model's self-encoded codes,
        row-aligned across models and with the image source.
    images : sequence of PIL images
        One image per cached image index, e.g. a list or :class:`CacheImages`; an optional
        ``label(index) -> str`` method gives captions.
    stats : usae_analysis.ConceptStats
        From :func:`usae_analysis.concept_statistics` on the same codes.
    energies : Tensor or ndarray, optional
        ``M x n`` per-model energy; by default :func:`usae_analysis.energy` of the code sums
        (the released, unsquared form with unit dictionary rows).
    grid, positions :
        Token layout, as :func:`concept_heatmaps` (pass ``cache.grid`` and ``cache.positions``).
    top_n : int
        Images per model shown for a concept.
    shared_ranking : bool
        Rank images by the concept's mean over all models' heatmaps, so every model shows the
        same images (the released demo); by default each model shows its own top images.
    include_dead : bool
        List concepts that never fire in any model too (they have nothing to show).
    """

    def __init__(self, codes: Mapping[str, analysis.SparseCodes], images: Sequence[Image.Image],
                 stats: analysis.ConceptStats, *, energies=None, grid: int = 14,
                 positions: np.ndarray | None = None, top_n: int = 5,
                 shared_ranking: bool = False, include_dead: bool = False):
        if list(codes) != list(stats.names):
            raise ValueError(f"codes are for models {list(codes)}, stats for {stats.names}.")
        self.names, self.codes, self.images = list(stats.names), dict(codes), images
        self.grid, self.positions = grid, positions
        self.tokens_per_image = _tokens_per_image(grid, positions)
        self.n_images = len(next(iter(codes.values()))) // self.tokens_per_image
        rows = {name: len(c) for name, c in codes.items()}
        if set(rows.values()) != {self.n_images * self.tokens_per_image}:
            raise ValueError(f"codes must hold whole {self.tokens_per_image}-token images, "
                             f"row-aligned across models; got {rows} rows.")
        if len(images) < self.n_images:
            raise ValueError(f"the image source has {len(images)} images, the codes "
                             f"{self.n_images}.")
        self.top_n, self.shared_ranking = top_n, shared_ranking
        self.fires, self.cofires = stats.fires.numpy(), stats.cofires.numpy()
        self.energy = np.asarray(analysis.energy(stats.code_sums, stats.n_tokens)
                                 if energies is None else energies, dtype=np.float64)
        self.aggregate_energy = self.energy.sum(axis=0)
        self.firing_entropy = analysis.firing_entropy(stats.fires).numpy()
        self.cofire_proportion = analysis.cofire_proportion(stats.fires, stats.cofires).numpy()
        self.live = np.ones(len(self.cofires), bool) if include_dead else self.fires.sum(0) > 0
        self._top: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self._orders: dict[str, np.ndarray] = {}
        self.controls = None  # the widgets, once widget() has built them

    @classmethod
    def from_cache(cls, cache: usae_cache.Cache, codes: Mapping[str, analysis.SparseCodes], *,
                   model=None, stats: analysis.ConceptStats | None = None,
                   **options) -> "ConceptExplorer":
        """The explorer of codes encoded from ``cache`` (e.g. ``encode_dataset(model,
        iter_rows(cache)).codes``); with ``model``, energies use its dictionary norms."""
        stats = stats if stats is not None else analysis.concept_statistics(codes)
        energies = None if model is None else analysis.energy(
            stats.code_sums, stats.n_tokens, analysis.dictionary_norms(model))
        return cls(codes, CacheImages(cache), stats, energies=energies, grid=cache.grid,
                   positions=cache.positions, **options)

    # -- pure logic --------------------------------------------------------------------------
    def concept_order(self, key: str = "energy") -> np.ndarray:
        """Listed concepts ordered by ``key`` (see ``SORT_KEYS``); ties by aggregate energy,
        largest first, then by id, so equal entropies still put important concepts first."""
        if key not in self._orders:
            statistic, largest_first = SORT_KEYS[key]
            values = {"energy": self.aggregate_energy, "firing_entropy": self.firing_entropy,
                      "cofire_proportion": self.cofire_proportion.mean(axis=0)}[statistic]
            primary = -values if largest_first else values
            ids = np.flatnonzero(self.live)
            self._orders[key] = ids[np.lexsort((ids, -self.aggregate_energy[ids], primary[ids]))]
        return self._orders[key].copy()

    def top_images(self, concept: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Model -> (image indices, their mean code), best first; computed once per concept.

        Up to ``top_n`` images, ranked by :func:`usae_analysis.top_images`; images where the
        concept never appears are left out rather than padded in, so a rare concept shows
        fewer panels instead of arbitrary images. With ``shared_ranking`` the images are the
        same for every model (ranked by the mean over models) and scores are per model.
        """
        if concept not in self._top:
            groups = [self.names] if self.shared_ranking else [[n] for n in self.names]
            self._top[concept] = {}
            for group in groups:
                chosen = analysis.top_images([self.codes[n] for n in group],
                                             self.tokens_per_image, [concept], self.top_n)
                chosen = chosen[0].numpy()
                # A heatmap's mean is the ranking score; exact in float64 (fp16 summands).
                scores = {n: self.heatmaps(concept, n, chosen).sum(axis=(1, 2), dtype=np.float64)
                          / self.tokens_per_image for n in group}
                shown = np.mean(list(scores.values()), axis=0) > 0
                self._top[concept].update({n: (chosen[shown], scores[n][shown]) for n in group})
        return self._top[concept]

    def concept_info(self, concept: int) -> dict:
        """The concept's statistics: concept-level values and one row per model."""
        rank = np.flatnonzero(self.concept_order("energy") == concept)
        return {"concept": int(concept), "energy": float(self.aggregate_energy[concept]),
                "firing_entropy": float(self.firing_entropy[concept]),
                "cofires": int(self.cofires[concept]),
                "energy_rank": int(rank[0]) if len(rank) else None,
                "models": [{"model": name, "fires": int(self.fires[i, concept]),
                            "energy": float(self.energy[i, concept]),
                            "cofire_proportion": float(self.cofire_proportion[i, concept])}
                           for i, name in enumerate(self.names)]}

    def image_concepts(self, image: int, top: int = 8) -> ImageConcepts:
        """Top concepts of one image per model, shared ones marked (:func:`image_concepts`)."""
        return image_concepts(self.codes, image, self.tokens_per_image, top=top)

    def heatmaps(self, concept: int, model: str, images: Sequence[int]) -> np.ndarray:
        return concept_heatmaps(self.codes[model], images, concept, grid=self.grid,
                                positions=self.positions)

    # -- figures and tables ------------------------------------------------------------------
    def concept_title(self, concept: int) -> str:
        info = self.concept_info(concept)
        rank = "" if info["energy_rank"] is None else f"  (energy rank {info['energy_rank']})"
        return (f"concept {concept}{rank}: energy {info['energy']:.3g}, firing entropy "
                f"{info['firing_entropy']:.2f}, co-fires {info['cofires']:,}")

    def concept_figure(self, concepts: int | Sequence[int], *, size: int = 224) -> Figure:
        """Each concept's top images per model with heatmap overlays (paper Fig. 4 style)."""
        concepts = [int(concepts)] if np.ndim(concepts) == 0 else [int(c) for c in concepts]
        overlays, titles, subtitles, captions = {}, {}, {}, {}
        for concept in concepts:
            overlays[concept] = {}
            titles[concept] = self.concept_title(concept)
            for row in self.concept_info(concept)["models"]:
                name = row["model"]
                chosen, scores = self.top_images(concept)[name]
                maps = self.heatmaps(concept, name, chosen)
                overlays[concept][name] = [overlay(self.images[int(j)], m, size)
                                           for j, m in zip(chosen, maps)]
                subtitles[concept, name] = ("{model}: fires {fires:,}, energy {energy:.3g}, "
                                            "co-fire prop. {cofire_proportion:.2f}".format(**row))
                captions[concept, name] = [f"{_label(self.images, int(j))}\nmean {s:.3f}"
                                           for j, s in zip(chosen, scores)]
        return plot_concept_grid(overlays, titles=titles, subtitles=subtitles, captions=captions)

    def image_figure(self, image: int, top: int = 8) -> Figure:
        return plot_image_concepts(self.images[image], self.image_concepts(image, top),
                                   title=_label(self.images, image))

    def stats_html(self, concept: int) -> str:
        """The statistics of :meth:`concept_info` as a small HTML table."""
        cells = "".join(
            f"<tr><td>{html.escape(r['model'])}</td><td>{r['fires']:,}</td>"
            f"<td>{r['energy']:.4g}</td><td>{r['cofire_proportion']:.3f}</td></tr>"
            for r in self.concept_info(concept)["models"])
        return (f"<p><b>{html.escape(self.concept_title(concept))}</b></p>"
                "<table><tr><th>model</th><th>fires</th><th>energy</th>"
                f"<th>co-fire proportion</th></tr>{cells}</table>")

    def static_view(self, concept: int | None = None, *, show_table: bool = True) -> Figure:
        """A first view without a live kernel: the concept's figure (default: the top concept
        by energy), after displaying its statistics table as HTML when run under IPython.

        Leave the returned figure as a cell's last expression to show it once (the figures are
        not registered with pyplot, so nothing else displays them).
        """
        if concept is None:
            order = self.concept_order()
            if not len(order):
                raise ValueError("no concept fires in any model: nothing to show.")
            concept = int(order[0])
        ipython = sys.modules.get("IPython")  # imported wherever a kernel runs
        if show_table and ipython is not None and ipython.get_ipython() is not None:
            from IPython.display import HTML, display

            display(HTML(self.stats_html(concept)))
        return self.concept_figure(concept)

    # -- widgets -----------------------------------------------------------------------------
    def widget(self):
        """The interactive explorer (an ``ipywidgets.Tab``); its controls are ``.controls``.

        Concept tab: sort key, rank slider and concept dropdown (kept in step), images per
        model. Image tab: an image slider. A change redraws that tab's Output (a new sort order
        keeps the current concept, so it redraws nothing).
        """
        import ipywidgets as w

        order = self.concept_order("energy")
        c = SimpleNamespace(
            sort=w.Dropdown(options=list(SORT_KEYS), value="energy", description="sort by"),
            rank=w.IntSlider(min=0, max=max(len(order) - 1, 0), description="rank",
                             continuous_update=False),
            concept=w.Dropdown(options=self._options(order), description="concept"),
            count=w.IntSlider(value=self.top_n, min=1, max=12, description="images",
                              continuous_update=False),
            image=w.IntSlider(min=0, max=self.n_images - 1, description="image",
                              continuous_update=False),
            concept_view=w.Output(), image_view=w.Output())
        self.controls, self._order, self._syncing, self._shown = c, order, False, None
        c.sort.observe(self._on_sort, names="value")
        c.rank.observe(lambda _: self._select(int(self._order[c.rank.value])), names="value")
        c.concept.observe(lambda _: self._select(c.concept.value), names="value")
        c.count.observe(self._on_count, names="value")
        c.image.observe(lambda _: self.render_image(), names="value")
        self.render_concept()
        self.render_image()
        return w.Tab(children=[
            w.VBox([w.HBox([c.sort, c.concept]), w.HBox([c.rank, c.count]), c.concept_view]),
            w.VBox([c.image, c.image_view])], titles=("concept", "image"))

    def _options(self, order: np.ndarray) -> list[tuple[str, int]]:
        return [(f"{rank}: concept {c}", int(c)) for rank, c in enumerate(order)]

    def _select(self, concept: int) -> None:
        """Make ``concept`` current in both controls, then render it unless already shown
        (a new sort order keeps the concept: nothing to redraw)."""
        if self._syncing or concept is None:
            return
        self._syncing = True
        try:
            self.controls.concept.value = int(concept)
            self.controls.rank.value = int(np.flatnonzero(self._order == concept)[0])
        finally:
            self._syncing = False
        if concept != self._shown:
            self.render_concept()

    def _on_sort(self, change) -> None:
        current = self.controls.concept.value
        self._order = self.concept_order(change["new"])
        self._syncing = True  # new options reset the dropdown: do not render the interim value
        try:
            self.controls.concept.options = self._options(self._order)
            self.controls.rank.max = max(len(self._order) - 1, 0)
        finally:
            self._syncing = False
        self._select(current if current in self._order else int(self._order[0]))

    def _on_count(self, change) -> None:
        self.top_n = change["new"]
        self._top.clear()  # cached top lists were for the old count
        self.render_concept()

    def render_concept(self) -> None:
        concept = self.controls.concept.value
        if concept is not None:
            _show(self.controls.concept_view, self.concept_figure(concept),
                  self.stats_html(concept))
            self._shown = concept

    def render_image(self) -> None:
        _show(self.controls.image_view, self.image_figure(self.controls.image.value))


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _show(output, figure: Figure, html_text: str | None = None) -> None:
    """Replace an ``ipywidgets.Output``'s content with a figure (and HTML above it).

    Setting ``outputs`` directly, rather than ``with output: display(...)``, works the same
    with or without a kernel, so the widget layer is testable without a browser.
    """
    png = base64.b64encode(figure_png(figure)).decode("ascii")
    shown = ([{"text/html": html_text, "text/plain": "statistics"}] if html_text else []) + [
        {"image/png": png, "text/plain": "<Figure>"}]
    output.outputs = tuple({"output_type": "display_data", "metadata": {}, "data": data}
                           for data in shown)
