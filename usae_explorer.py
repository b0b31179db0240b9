"""The concept explorer's logic: orders, search, top images, statistics, histograms, nearest
concepts, an image's concepts and the USAE's translation between models (spec 5.7).

:class:`ConceptExplorer` holds the data (sparse codes, statistics, an image source, optionally
the image activations and the USAE) and answers every question the explorer asks, as plain
values that tests check without a browser. The pictures are :mod:`usae_heatmaps`' (the paper
figures: :meth:`ConceptExplorer.concept_figure`, :meth:`ConceptExplorer.static_view`), the
ipywidgets layer is :mod:`usae_explorer_widgets` (:meth:`ConceptExplorer.widget`).

Image indices are *cached* image indices: image ``i`` owns code rows ``i * T .. (i + 1) * T - 1``
(``row // T``); :class:`CacheImages` maps them to files. Imports ``usae_analysis``,
``usae_cache`` and ``usae_heatmaps`` (whose names are re-exported here, as before the split).
"""
from __future__ import annotations

import html
import sys
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

import usae_analysis as analysis
import usae_cache
from usae_heatmaps import (SHARED_ALL, SHARED_SOME, UNSHARED, CacheImages,
                           ImageConcepts, NotebookFigure, _label, _tokens_per_image,
                           concept_heatmaps, figure_png, overlay, plot_concept_grid,
                           plot_image_concepts, scale_heatmap, squash, upsample_heatmap)
from usae_heatmaps import fixed as _fixed, number as _number

__all__ = [  # the heatmap names are re-exported: callers of the unsplit module keep working
    "SHARED_ALL", "SHARED_SOME", "UNSHARED", "CacheImages", "ImageConcepts", "NotebookFigure",
    "concept_heatmaps", "figure_png", "overlay", "plot_concept_grid", "plot_image_concepts",
    "scale_heatmap", "squash", "upsample_heatmap", "SORT_KEYS", "NEAREST_BY", "image_concepts",
    "Hits", "concept_hits", "Histograms", "activation_histograms", "Neighbour",
    "nearest_by_cofiring", "nearest_by_dictionary", "Translation", "mean_token",
    "translation_r2", "CacheActivations", "ConceptExplorer"]

SORT_KEYS = {  # label -> (statistic, largest first); co-fire proportion: mean over models
    "energy": ("energy", True),
    "firing entropy": ("firing_entropy", True),
    "co-fire proportion": ("cofire_proportion", True),
    "model-unique (low entropy)": ("firing_entropy", False),
}
NEAREST_BY = ("co-firing", "dictionary cosine")


# ----------------------------------------------------------------------------------------------
# Pure functions of codes, dictionaries and activations


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


class Hits(NamedTuple):
    """Where one concept is among a model's k selected codes: ``rows`` (increasing) and the
    code ``values`` there (float32; zero when TopK kept a concept with no activation)."""

    rows: np.ndarray
    values: np.ndarray


def concept_hits(codes: analysis.SparseCodes, concept: int) -> Hits:
    """The rows of ``codes`` that selected ``concept`` and its value on each: one pass, in
    numpy (a quarter of ``torch.nonzero``'s time on the default run's codes)."""
    k = codes.indices.shape[1]
    flat = np.flatnonzero(codes.indices.numpy().reshape(-1) == concept)  # row-major order
    return Hits(flat // k, codes.values.numpy().reshape(-1)[flat].astype(np.float32))


class Histograms(NamedTuple):
    """Per-model histograms of one concept's positive codes on shared bins.

    Attributes
    ----------
    edges : ndarray
        ``bins + 1`` bin edges from 0 to the largest code over all models.
    counts : dict
        Model -> ``bins`` token counts (tokens where the code is 0 are not counted).
    """

    edges: np.ndarray
    counts: dict[str, np.ndarray]


def activation_histograms(hits: Mapping[str, Hits], bins: int = 24) -> Histograms:
    """Histograms of every model's positive codes of a concept, on one set of bins so the
    models compare bar by bar. A concept no model activates gets edges 0..1 and zero counts."""
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"bins must be a positive integer, got {bins!r}.")
    positive = {name: h.values[h.values > 0] for name, h in hits.items()}
    top = max([float(v.max()) for v in positive.values() if v.size] + [0.0])
    edges = np.linspace(0.0, top if top > 0 else 1.0, bins + 1)
    return Histograms(edges, {name: np.histogram(v, edges)[0] for name, v in positive.items()})


class Neighbour(NamedTuple):
    concept: int
    score: float  # Jaccard index of firing tokens, or mean dictionary cosine over models
    together: int  # tokens where both fire in the same model (0 for dictionary cosine)


def nearest_by_cofiring(codes: Mapping[str, analysis.SparseCodes], concept: int,
                        fires: np.ndarray, *, count: int = 8,
                        threshold: float = analysis.FIRING_THRESHOLD,
                        hits: Mapping[str, Hits] | None = None) -> list[Neighbour]:
    """Concepts that fire on the same tokens as ``concept``, by pooled Jaccard index.

    For each model, the tokens where ``concept`` fires (code above ``threshold``) are read and
    every other concept firing on them counted: ``together[d]`` sums these over models. The
    score is ``together / (fires_c + fires_d - together)`` with fires summed over models,
    the Jaccard index of the two concepts' firing token sets, pooled over models. Only the
    rows where the concept fires are read, so a query costs one pass over the indices.

    Parameters
    ----------
    fires : ndarray
        ``M x n`` firing counts of the same codes at the same threshold (``ConceptStats.fires``).
    hits : mapping, optional
        Model -> :func:`concept_hits` of ``concept``, when already found.

    Returns
    -------
    list of Neighbour
        Up to ``count`` concepts with ``together > 0``, best first, ties by id.
    """
    fires = np.asarray(fires)
    n = fires.shape[1]
    assert fires.shape[0] == len(codes), (fires.shape, list(codes))
    together = np.zeros(n, dtype=np.int64)
    for name, model in codes.items():
        found = concept_hits(model, concept) if hits is None else hits[name]
        rows = found.rows[found.values > threshold]  # distinct: TopK indices are
        fired = model.values.numpy()[rows].astype(np.float32) > threshold
        together += np.bincount(model.indices.numpy()[rows][fired].astype(np.int64),
                                minlength=n)
    together[concept] = 0
    totals = fires.sum(axis=0).astype(np.float64)
    union = totals[concept] + totals - together
    score = np.divide(together, union, out=np.zeros(n), where=union > 0)
    candidates = np.flatnonzero(together > 0)
    order = candidates[np.lexsort((candidates, -score[candidates]))][:count]
    return [Neighbour(int(d), float(score[d]), int(together[d])) for d in order]


def nearest_by_dictionary(dictionaries: Mapping[str, torch.Tensor], concept: int, *,
                          count: int = 8) -> list[Neighbour]:
    """Concepts whose dictionary rows point the same way as ``concept``'s: the cosine of the
    two rows in each model's dictionary, averaged over models (largest first, ties by id)."""
    total = None
    for dictionary in dictionaries.values():
        rows = dictionary.detach().double()
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cosine = rows @ rows[concept]
        total = cosine if total is None else total + cosine
    score = (total / len(dictionaries)).numpy()
    others = np.delete(np.arange(len(score)), concept)
    order = others[np.lexsort((others, -score[others]))][:count]
    return [Neighbour(int(d), float(score[d]), 0) for d in order]


class Translation(NamedTuple):
    """Model A's tokens of one image encoded, then decoded into model B.

    Attributes
    ----------
    r2 : ndarray
        Per-token R² of B's reconstruction (see :func:`translation_r2`).
    image_r2 : float
        The same ratio over all the image's tokens:
        ``1 - sum ||b - b_hat||² / sum ||b - b_mean||²``.
    """

    r2: np.ndarray
    image_r2: float


def mean_token(model, name: str) -> torch.Tensor:
    """Model ``name``'s mean token as the USAE's standardisation knows it: its per-channel mean
    over the training cache's standardisation sample when channels are centred (the offline
    preset), else its scalar mean in every channel (the released standardisation)."""
    return model.unstandardize(name, torch.zeros(1, model.dims[name]))[0].detach()


@torch.no_grad()
def translation_r2(model, source: str, target: str, source_acts, target_acts,
                   target_mean=None) -> Translation:
    """Per-token R² of decode_B(encode_A(a)) against B's own tokens of the same image.

    ``r2[t] = 1 - ||b_t - b_hat_t||² / ||b_t - b_mean||²`` in B's raw activation space, where
    ``b_mean`` is ``target_mean`` (default: :func:`mean_token`, B's mean token from the USAE's
    standardisation). 1 is a perfect translation, 0 no better than the mean token, negative
    worse. The model is run in eval mode (BatchNorm on its running statistics) and left in
    the mode it was in.

    Parameters
    ----------
    source_acts, target_acts : array or Tensor
        ``T x d_A`` and ``T x d_B`` raw activations of the same tokens (rows aligned).
    """
    a = torch.as_tensor(np.asarray(source_acts), dtype=torch.float32)
    b = torch.as_tensor(np.asarray(target_acts), dtype=torch.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"source and target activations must hold the same tokens, got "
                         f"{a.shape[0]} and {b.shape[0]} rows.")
    mean = mean_token(model, target) if target_mean is None else torch.as_tensor(target_mean)
    training = model.training
    model.eval()
    try:
        recon = model.decode(target, model.encode(source, a)).double()
    finally:
        model.train(training)
    error = (b - recon).square().sum(dim=1)
    spread = (b - mean.double()).square().sum(dim=1)
    r2 = 1 - error / spread.clamp_min(1e-12)
    return Translation(r2.numpy(), float(1 - error.sum() / spread.sum().clamp_min(1e-12)))


class CacheActivations:
    """``activations(image) -> {model: T x d float32}``: one image's rows of a cache's arrays
    (only those rows are read from the memmaps), under the USAE's model ``names`` when given
    (in the cache's order: a cache names models by backbone, e.g. ``random:dinov2``)."""

    def __init__(self, cache: usae_cache.Cache, names: Sequence[str] | None = None):
        names = list(cache.arrays) if names is None else list(names)
        assert len(names) == len(cache.arrays), f"{names} for the cache's {list(cache.arrays)}"
        self.arrays = dict(zip(names, cache.arrays.values()))
        self.tokens = cache.tokens_per_image

    def __call__(self, image: int) -> dict[str, np.ndarray]:
        rows = slice(int(image) * self.tokens, (int(image) + 1) * self.tokens)
        return {name: np.asarray(array[rows], dtype=np.float32)
                for name, array in self.arrays.items()}


# ----------------------------------------------------------------------------------------------
# Explorer


class ConceptExplorer:
    """Browse concepts across models: top images with heatmaps, statistics, histograms, nearest
    concepts, an image's concepts, and the translation of an image from one model to another.

    Parameters
    ----------
    codes : mapping
        Model name -> :class:`usae_analysis.SparseCodes`, each model's self-encoded codes,
        row-aligned across models and with the image source.
    images : sequence of PIL images
        One image per cached image index, e.g. a list or :class:`CacheImages`; an optional
        ``label(index) -> str`` method gives captions and the image search.
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
    model : usae_core.USAE, optional
        The USAE that made the codes: nearest concepts by dictionary cosine and, with
        ``activations``, the translation view need it.
    activations : callable, optional
        ``activations(image) -> {model: T x d raw activations}`` of one cached image, rows as
        the codes' (:class:`CacheActivations` for a cache).
    """

    def __init__(self, codes: Mapping[str, analysis.SparseCodes], images: Sequence[Image.Image],
                 stats: analysis.ConceptStats, *, energies=None, grid: int = 14,
                 positions: np.ndarray | None = None, top_n: int = 5,
                 shared_ranking: bool = False, include_dead: bool = False, model=None,
                 activations: Callable[[int], Mapping[str, np.ndarray]] | None = None):
        if list(codes) != list(stats.names):
            raise ValueError(f"codes are for models {list(codes)}, stats for {stats.names}.")
        if not (isinstance(top_n, (int, np.integer)) and top_n >= 1):
            raise ValueError(f"top_n must be a positive integer, got {top_n!r}.")
        if model is not None and set(model.names) != set(codes):
            raise ValueError(f"the model is over {model.names}, the codes over {list(codes)}: "
                             "pass the USAE that encoded these codes.")
        self.names, self.codes, self.images = list(stats.names), dict(codes), images
        self.grid, self.positions = grid, positions
        self.tokens_per_image = _tokens_per_image(grid, positions)
        self.n_images = len(next(iter(codes.values()))) // self.tokens_per_image
        self.n_concepts = next(iter(codes.values())).n_concepts
        rows = {name: len(c) for name, c in codes.items()}
        if set(rows.values()) != {self.n_images * self.tokens_per_image}:
            raise ValueError(f"codes must hold whole {self.tokens_per_image}-token images, "
                             f"row-aligned across models; got {rows} rows.")
        if len(images) < self.n_images:
            raise ValueError(f"the image source has {len(images)} images, the codes "
                             f"{self.n_images}.")
        self.top_n, self.shared_ranking = int(top_n), shared_ranking
        self.model, self.activations = model, activations
        self.fires, self.cofires = stats.fires.numpy(), stats.cofires.numpy()
        self.energy = np.asarray(analysis.energy(stats.code_sums, stats.n_tokens)
                                 if energies is None else energies, dtype=np.float64)
        self.aggregate_energy = self.energy.sum(axis=0)
        self.firing_entropy = analysis.firing_entropy(stats.fires).numpy()
        self.cofire_proportion = analysis.cofire_proportion(stats.fires, stats.cofires).numpy()
        self.cofire_chance = analysis.chance_cofire_proportion(stats.fires, stats.n_tokens).numpy()
        self.live = np.ones(len(self.cofires), bool) if include_dead else self.fires.sum(0) > 0
        self._top: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self._orders: dict[str, np.ndarray] = {}
        self._hits: dict[int, dict[str, Hits]] = {}  # a few recent concepts (LRU by insertion)
        self._labels: list[str] | None = None
        self._translations: dict[tuple[int, str, str], Translation] = {}
        self.controls = None  # the widgets, once widget() has built them

    @classmethod
    def from_cache(cls, cache: usae_cache.Cache, codes: Mapping[str, analysis.SparseCodes], *,
                   model=None, stats: analysis.ConceptStats | None = None,
                   **options) -> "ConceptExplorer":
        """The explorer of codes encoded from ``cache`` (e.g. ``encode_dataset(model,
        iter_rows(cache)).codes``); with ``model``, energies use its dictionary norms, and
        nearest concepts by dictionary and the translation view are available."""
        stats = stats if stats is not None else analysis.concept_statistics(codes)
        energies = None if model is None else analysis.energy(
            stats.code_sums, stats.n_tokens, analysis.dictionary_norms(model))
        return cls(codes, CacheImages(cache), stats, energies=energies, grid=cache.grid,
                   positions=cache.positions, model=model,
                   activations=CacheActivations(cache, list(codes)), **options)

    # -- concepts: orders, search, statistics ------------------------------------------------
    def _statistic(self, key: str) -> np.ndarray:
        statistic = SORT_KEYS[key][0]
        return {"energy": self.aggregate_energy, "firing_entropy": self.firing_entropy,
                "cofire_proportion": self.cofire_proportion.mean(axis=0)}[statistic]

    def concept_order(self, key: str = "energy") -> np.ndarray:
        """Listed concepts ordered by ``key`` (see ``SORT_KEYS``); ties by aggregate energy,
        largest first, then by id, so equal entropies still put important concepts first."""
        if key not in SORT_KEYS:
            raise ValueError(f"unknown sort key {key!r}: choose one of {list(SORT_KEYS)}.")
        if key not in self._orders:
            values = self._statistic(key)
            primary = -values if SORT_KEYS[key][1] else values
            ids = np.flatnonzero(self.live)
            self._orders[key] = ids[np.lexsort((ids, -self.aggregate_energy[ids], primary[ids]))]
        return self._orders[key].copy()

    def concept_labels(self, key: str = "energy") -> list[tuple[str, int]]:
        """``(label, concept)`` per listed concept in ``key``'s order; labels start with the id
        ("801 · rank 3 · energy 1.2") so typing an id in a dropdown finds that concept."""
        values, name = self._statistic(key), key.split(" (")[0]
        name = "entropy" if "entropy" in key else name
        return [(f"{c} · rank {rank} · {name} {_number(values[c])}", int(c))
                for rank, c in enumerate(self.concept_order(key))]

    def find_concept(self, text: str | int) -> int:
        """The concept whose id is ``text`` (e.g. the search box's "801"), checked.

        Raises
        ------
        ValueError
            Not an integer, out of range, or a concept that never fires (not listed), each
            with what to type instead.
        """
        raw = str(text).strip().lstrip("#")
        try:
            concept = int(raw)
        except ValueError:
            raise ValueError(f"{str(text)!r} is not a concept id: type a whole number in "
                             f"0..{self.n_concepts - 1}.") from None
        if not 0 <= concept < self.n_concepts:
            raise ValueError(f"concept {concept} does not exist: ids run 0..{self.n_concepts - 1}.")
        if not self.live[concept]:
            raise ValueError(f"concept {concept} never fires in any model on these images, so "
                             "it is not listed (include_dead=True lists it).")
        return concept

    def concept_info(self, concept: int) -> dict:
        """The concept's statistics: concept-level values and one row per model."""
        rank = np.flatnonzero(self.concept_order("energy") == concept)
        return {"concept": int(concept), "energy": float(self.aggregate_energy[concept]),
                "firing_entropy": float(self.firing_entropy[concept]),
                "cofires": int(self.cofires[concept]),
                "energy_rank": int(rank[0]) if len(rank) else None,
                "models": [{"model": name, "fires": int(self.fires[i, concept]),
                            "energy": float(self.energy[i, concept]),
                            "cofire_proportion": float(self.cofire_proportion[i, concept]),
                            "cofire_chance": float(self.cofire_chance[i, concept])}
                           for i, name in enumerate(self.names)]}

    def hits(self, concept: int) -> dict[str, Hits]:
        """Model -> where the concept is selected and its values (:func:`concept_hits`); the
        histograms and co-firing of one concept share this pass, kept for 8 concepts."""
        if concept not in self._hits:
            if len(self._hits) >= 8:
                self._hits.pop(next(iter(self._hits)))
            self._hits[concept] = {n: concept_hits(c, concept) for n, c in self.codes.items()}
        return self._hits[concept]

    def histograms(self, concept: int, bins: int = 24) -> Histograms:
        """Every model's histogram of the concept's positive codes on shared bins."""
        return activation_histograms(self.hits(concept), bins)

    def nearest(self, concept: int, by: str = "co-firing", count: int = 8) -> list[Neighbour]:
        """Concepts near ``concept``: ``"co-firing"`` (:func:`nearest_by_cofiring`, pooled
        Jaccard index of firing tokens) or ``"dictionary cosine"`` (needs the model)."""
        if by == "co-firing":
            return nearest_by_cofiring(self.codes, concept, self.fires, count=count,
                                       hits=self.hits(concept))
        if by != "dictionary cosine":
            raise ValueError(f"unknown neighbourhood {by!r}: choose one of {NEAREST_BY}.")
        if self.model is None:
            raise ValueError("nearest concepts by dictionary cosine need the USAE: pass "
                             "model= to ConceptExplorer or from_cache.")
        dictionaries = {n: self.model.dictionary(n) for n in self.names}
        return nearest_by_dictionary(dictionaries, concept, count=count)

    # -- images ------------------------------------------------------------------------------
    def top_images(self, concept: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Model -> (image indices, their mean code), best first; computed once per concept.

        Up to ``top_n`` images, ranked by :meth:`ranked_images`; images where the
        concept never appears are left out rather than padded in, so a rare concept shows
        fewer panels instead of arbitrary images. With ``shared_ranking`` the images are the
        same for every model (ranked by the mean over models) and scores are per model.
        """
        if concept not in self._top:
            groups = [self.names] if self.shared_ranking else [[n] for n in self.names]
            self._top[concept] = {}
            for group in groups:
                chosen = self.ranked_images(concept, group)[:self.top_n]
                # A heatmap's mean is the ranking score; exact in float64 (fp16 summands).
                scores = {n: self.heatmaps(concept, n, chosen).sum(axis=(1, 2), dtype=np.float64)
                          / self.tokens_per_image for n in group}
                shown = np.mean(list(scores.values()), axis=0) > 0
                self._top[concept].update({n: (chosen[shown], scores[n][shown]) for n in group})
        return self._top[concept]

    def ranked_images(self, concept: int, group: Sequence[str]) -> np.ndarray:
        """Every image, highest first, ties by lower index: :func:`usae_analysis.top_images`'
        ranking and arithmetic, from the concept's :meth:`hits` (no second pass over codes)."""
        means = []
        for found in (self.hits(concept)[name] for name in group):
            sums = np.bincount(found.rows // self.tokens_per_image,
                               found.values.astype(np.float64), minlength=self.n_images)
            means.append((sums / self.tokens_per_image).astype(np.float32))
        return np.argsort(-(sum(means) / len(means)), kind="stable")

    def set_top_n(self, count: int) -> None:
        """Show ``count`` images per model from now on (cached top lists are dropped)."""
        if not (isinstance(count, (int, np.integer)) and count >= 1):
            raise ValueError(f"the image count must be a positive integer, got {count!r}.")
        self.top_n = int(count)
        self._top.clear()

    def heatmaps(self, concept: int, model: str, images: Sequence[int]) -> np.ndarray:
        return concept_heatmaps(self.codes[model], images, concept, grid=self.grid,
                                positions=self.positions)

    def image_concepts(self, image: int, top: int = 8) -> ImageConcepts:
        """Top concepts of one image per model, shared ones marked (:func:`image_concepts`)."""
        self._check_image(image)
        return image_concepts(self.codes, image, self.tokens_per_image, top=top)

    def image_label(self, image: int) -> str:
        return _label(self.images, int(image))

    def search_images(self, query: str = "", limit: int | None = None) -> np.ndarray:
        """Cached image indices whose label contains ``query`` (case-insensitive); a number
        (``"12"`` or ``"#12"``) also finds that index, first. Empty: every image."""
        if self._labels is None:
            self._labels = [self.image_label(i).lower() for i in range(self.n_images)]
        text = str(query).strip().lower()
        found = [i for i, label in enumerate(self._labels) if text in label]
        number = text.lstrip("#")
        if number.isdigit() and int(number) < self.n_images:
            found = [int(number)] + [i for i in found if i != int(number)]
        return np.asarray(found[:limit], dtype=np.int64)

    def _check_image(self, image: int) -> None:
        if not (isinstance(image, (int, np.integer)) and 0 <= image < self.n_images):
            raise ValueError(f"image {image!r} is not a cached image index: use 0.."
                             f"{self.n_images - 1}.")

    # -- translation -------------------------------------------------------------------------
    def translation_map(self, image: int, source: str, target: str) -> tuple[np.ndarray,
                                                                                Translation]:
        """``grid x grid`` per-patch R² of decode_target(encode_source(a)) on ``image``
        (:func:`translation_r2`; NaN where the cache kept no token), and the translation."""
        if self.model is None or self.activations is None:
            raise ValueError("the translation view needs the USAE and the image activations: "
                             "use ConceptExplorer.from_cache(cache, codes, model=model).")
        for name in (source, target):
            if name not in self.names:
                raise ValueError(f"unknown model {name!r}: choose one of {self.names}.")
        self._check_image(image)
        key = (int(image), source, target)
        if key not in self._translations:  # a view redraws its pairs: compute each once
            if len(self._translations) >= 64:
                self._translations.pop(next(iter(self._translations)))
            acts = self.activations(image)
            self._translations[key] = translation_r2(self.model, source, target, acts[source],
                                                     acts[target])
        result = self._translations[key]
        picture = np.full(self.grid * self.grid, np.nan)
        places = (np.arange(self.tokens_per_image) if self.positions is None
                  else np.asarray(self.positions)[image])
        picture[places] = result.r2
        return picture.reshape(self.grid, self.grid), result

    # -- figures and tables ------------------------------------------------------------------
    def concept_title(self, concept: int) -> str:
        info = self.concept_info(concept)
        rank = "" if info["energy_rank"] is None else f"  (energy rank {info['energy_rank']})"
        return (f"concept {concept}{rank}: energy {_number(info['energy'])}, firing entropy "
                f"{_fixed(info['firing_entropy'])}, co-fires {info['cofires']:,}")

    def concept_figure(self, concepts: int | Sequence[int], *, size: int = 224) -> Figure:
        """Each concept's top images per model with heatmap overlays (paper Fig. 4 style;
        per-map min-max normalisation, as the released figures)."""
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
                # three short lines: one line is wider than a group of one or two images
                subtitles[concept, name] = (f"{name}\nfires {row['fires']:,}, energy "
                                            f"{_number(row['energy'])}\nco-fire prop. "
                                            f"{_fixed(row['cofire_proportion'])} (chance "
                                            f"{_fixed(row['cofire_chance'])})")
                captions[concept, name] = [f"{_label(self.images, int(j))}\nmean "
                                           f"{_fixed(s, 3)}" for j, s in zip(chosen, scores)]
        return plot_concept_grid(overlays, titles=titles, subtitles=subtitles, captions=captions)

    def image_figure(self, image: int, top: int = 8) -> Figure:
        return plot_image_concepts(self.images[image], self.image_concepts(image, top),
                                   title=_label(self.images, image))

    def stats_html(self, concept: int) -> str:
        """The statistics of :meth:`concept_info` as a small HTML table."""
        cells = "".join(
            f"<tr><td>{html.escape(r['model'])}</td><td>{r['fires']:,}</td>"
            f"<td>{_number(r['energy'], 4)}</td><td>{_fixed(r['cofire_proportion'], 3)}</td>"
            f"<td>{_fixed(r['cofire_chance'], 3)}</td></tr>"
            for r in self.concept_info(concept)["models"])
        return (f"<p><b>{html.escape(self.concept_title(concept))}</b></p>"
                "<table><tr><th>model</th><th>fires</th><th>energy</th>"
                f"<th>co-fire proportion</th><th>chance</th></tr>{cells}</table>")

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
    def widget(self, **options):
        """The interactive explorer, an ``ipywidgets.Tab`` (concepts, images, translation);
        its controls are ``.controls`` (see :class:`usae_explorer_widgets.ExplorerWidget`,
        which takes ``options`` such as ``image_px``)."""
        import usae_explorer_widgets

        view = usae_explorer_widgets.ExplorerWidget(self, **options)
        self.controls = view.controls
        return view.tabs
