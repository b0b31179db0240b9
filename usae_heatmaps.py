"""Concept heatmaps and the pictures made of them: overlays, the paper's concept grids, and
images as HTML (spec 5.7).

1. **Heatmaps**: a concept's code on each token of an image, placed on the model grid
   (:func:`concept_heatmaps`). Two normalisations: the released code's per-map min-max
   (:func:`upsample_heatmap`, the paper figures) and a scale shared by every map of a view
   (:func:`scale_heatmap`, the explorer: equal colours mean equal codes, across images and
   models). :func:`overlay` lays either over the image as the models see it (:func:`overlays`:
   a batch at once, the same pixels).
2. **Figures**: :func:`plot_concept_grid` (paper Fig. 4: one concept, every model's top images)
   and :func:`plot_image_concepts` (which concepts fire on one image, per model). They return
   :class:`matplotlib.figure.Figure` objects made without pyplot, so nothing is shown or kept
   alive behind the caller's back: a notebook displays or saves them.
3. **HTML**: :func:`image_tag` (an RGB array as an inline JPEG or PNG ``<img>``) and
   :func:`colorbar_html` (a colour scale with its end values), for the explorer's widgets.

Image sources are anything with a length and a PIL image per cached image index (a list
qualifies; :class:`CacheImages` reads a cache's files); an optional ``label(index) -> str``
gives captions. Imports ``usae_analysis``, ``usae_cache`` and ``usae_images`` (decoding).
"""
from __future__ import annotations

import base64
import functools
import html
import io
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
    rows = images[:, None] * tokens + np.arange(tokens)
    # numpy: torch's advanced indexing of a large tensor costs ms per call (the explorer's
    # latency). TopK indices are distinct within a token, so at most one of the k slots matches.
    hits = codes.indices.numpy()[rows] == concept
    heat = (codes.values.numpy()[rows].astype(np.float32) * hits).sum(axis=-1)
    maps = np.zeros((len(images), grid * grid), dtype=np.float32)
    if positions is None:
        maps[:] = heat
    else:
        np.put_along_axis(maps, np.asarray(positions)[images].astype(np.int64), heat, axis=1)
    return maps.reshape(len(images), grid, grid)


def _bicubic(heatmap: np.ndarray, size: int) -> np.ndarray:
    """``n x size x size`` float32: each ``h x w`` map (or the one map) upsampled bicubically,
    torch's kernel; the rest is numpy (small tensors pay torch's per-op overhead)."""
    heat = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
    heat = heat.reshape(-1, 1, *heat.shape[-2:])
    return F.interpolate(heat, size=(size, size), mode="bicubic", align_corners=False)[:, 0].numpy()


def upsample_heatmap(heatmap: np.ndarray, size: int = 224) -> np.ndarray:
    """Bicubic upsampling to ``size x size`` then min-max normalisation to [0, 1].

    torch's bicubic (a = -0.75, half-pixel centres, clamped borders) is the kernel of the
    released code's ``cv2.INTER_CUBIC``. As there, cubic overshoot is kept and absorbed by the
    min-max step; a constant map becomes all zeros. Accepts ``h x w`` or ``n x h x w``.
    """
    single = np.ndim(heatmap) == 2
    heat = _bicubic(heatmap, size)
    low = heat.min(axis=(1, 2), keepdims=True)
    span = heat.max(axis=(1, 2), keepdims=True) - low
    heat = np.divide(heat - low, span, out=np.zeros_like(heat), where=span > 0)
    return heat[0] if single else heat


def scale_heatmap(heatmap: np.ndarray, vmax: float, size: int = 224) -> np.ndarray:
    """Bicubic upsampling to ``size x size`` then division by ``vmax``, clipped to [0, 1].

    The explorer's normalisation: with one ``vmax`` for every map of a view (the concept's
    largest code over all shown images of all models), equal colours are equal codes, so a
    concept firing weakly in one model looks weak there. Cubic overshoot is clipped, not
    stretched. ``vmax <= 0`` (nothing fires) gives all zeros. Accepts ``h x w`` or ``n x h x w``.
    """
    single = np.ndim(heatmap) == 2
    heat = _bicubic(heatmap, size)
    heat = np.clip(heat / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(heat)
    return heat[0] if single else heat


def squash(image: Image.Image, size: int = 224) -> np.ndarray:
    """``size x size x 3`` uint8: the image resized without keeping its aspect, as every
    backbone's preprocessing does (spec 1.3), so heatmap cells land on the right pixels."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


def overlay(image: Image.Image | np.ndarray, heatmap: np.ndarray, size: int = 224, *,
            alpha: float = 1.0, cmap: str = "viridis", vmax: float | None = None) -> np.ndarray:
    """Heatmap over the squashed image: ``size x size x 3`` uint8.

    The heatmap goes through :func:`upsample_heatmap` (per-map min-max, as released) or, given
    ``vmax``, :func:`scale_heatmap` (a shared scale), then is coloured with ``cmap`` whose
    opacity ramps from 0 (no heat: the image shows unchanged) to ``alpha`` (hottest pixel), as
    overcomplete's ``VIRIDIS_ALPHA`` used by the released code. ``image`` may be a PIL image or
    an already squashed ``size x size x 3`` uint8 array (saves resizing it once per map).
    """
    if isinstance(image, np.ndarray):
        assert image.shape == (size, size, 3) and image.dtype == np.uint8, image.shape
        base = image.astype(np.float32) / 255
    else:
        base = squash(image, size).astype(np.float32) / 255
    heat = upsample_heatmap(heatmap, size) if vmax is None else scale_heatmap(heatmap, vmax, size)
    colours = matplotlib.colormaps[cmap](heat)[..., :3]
    opacity = alpha * heat[..., None]
    mixed = base * (1 - opacity) + colours * opacity
    return np.clip(np.rint(mixed * 255), 0, 255).astype(np.uint8)


def overlays(pictures: Sequence[np.ndarray], heatmaps: np.ndarray, size: int = 224, *,
             alpha: float = 1.0, cmap: str = "viridis", vmax=None) -> np.ndarray:
    """:func:`overlay` of each squashed picture with its heatmap at once, ``n x size x size x
    3`` uint8, the same pixels: one bicubic pass for the batch and the colour map read from
    its table (``cmap``'s own lookup, without matplotlib's per-call checks). ``vmax``: None
    (per-map min-max), one shared scale, or one scale per map."""
    base = np.stack(pictures) if len(pictures) else np.zeros((0, size, size, 3), np.uint8)
    assert base.shape == (len(heatmaps), size, size, 3) and base.dtype == np.uint8, base.shape
    if vmax is None:
        heat = upsample_heatmap(heatmaps, size).reshape(len(base), size, size)
    else:  # scale_heatmap's arithmetic, map by map: float32 division by the map's scale
        heat = _bicubic(heatmaps, size) if len(base) else np.zeros((0, size, size), np.float32)
        for i, scale in enumerate(np.broadcast_to(np.asarray(vmax, dtype=np.float32),
                                                  (len(base),))):
            heat[i] = np.clip(heat[i] / scale, 0.0, 1.0) if scale > 0 else 0.0
    # overlay's arithmetic, in place: float32 image and opacity, float64 colours
    table = _colour_table(cmap)  # heat in [0, 1]: Colormap's index is min(heat * N, N - 1)
    mixed = table.take(np.minimum(heat * len(table), len(table) - 1).astype(np.intp), axis=0)
    opacity = alpha * heat[..., None]
    mixed *= opacity
    kept = base.astype(np.float32)
    kept /= 255
    kept *= 1 - opacity
    mixed += kept
    mixed *= 255
    return np.clip(np.rint(mixed, out=mixed), 0, 255, out=mixed).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _colour_table(cmap: str) -> np.ndarray:
    """``N x 3`` float64 colours of ``cmap`` (an integer index reads the table)."""
    table = matplotlib.colormaps[cmap](np.arange(matplotlib.colormaps[cmap].N))[:, :3]
    table.setflags(write=False)  # shared by every call
    return table


def colour_map(values: np.ndarray, vmin: float, vmax: float, *, cmap: str = "viridis",
               missing=(128, 128, 128), size: int = 224) -> np.ndarray:
    """A ``grid x grid`` map of values as a ``size x size x 3`` uint8 picture, one flat block
    per token (nearest upsampling: a per-patch quantity has no meaning between patches).

    Values are clipped to ``[vmin, vmax]``; NaN (a position with no value) is ``missing``.
    """
    values = np.asarray(values, dtype=np.float64)
    assert vmax > vmin, f"need vmin < vmax, got {vmin}, {vmax}"
    scaled = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / (vmax - vmin), 0, 1)
    rgb = np.rint(matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)
    rgb[np.isnan(values)] = missing
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.NEAREST), dtype=np.uint8)


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




def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()



# ----------------------------------------------------------------------------------------------
# HTML


def image_tag(picture: np.ndarray, *, width: int | None = None, title: str = "",
              fmt: str = "jpeg") -> str:
    """An ``h x w x 3`` uint8 array as an inline ``<img>`` (base64 JPEG, or PNG for exact
    pixels), shown ``width`` pixels wide (default: its own width)."""
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.dtype == np.uint8, \
        (picture.shape, picture.dtype)
    buffer = io.BytesIO()
    if fmt == "jpeg":  # photographs: a fraction of PNG's bytes and encoding time
        Image.fromarray(picture).save(buffer, format="JPEG", quality=88)
    else:
        Image.fromarray(picture).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    shown = picture.shape[1] if width is None else int(width)
    return (f'<img src="data:image/{fmt};base64,{data}" width="{shown}" '
            f'title="{html.escape(title)}" alt="{html.escape(title)}" style="display:block">')


def number(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, never ``-0``: a negative within 1e-9 of 0
    (float rounding of a quantity that cannot be negative) prints 0."""
    value = 0.0 if -1e-9 < float(value) <= 0 else float(value)
    text = f"{value:.{digits}g}"
    return "0" if float(text) == 0 else text


def fixed(value: float, decimals: int = 2) -> str:
    """``value`` with ``decimals`` decimals, never ``-0.00``."""
    text = f"{float(value):.{decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text


@functools.lru_cache(maxsize=8)
def _gradient(cmap: str) -> str:
    """``cmap`` as CSS gradient stops, every tenth (the same for every bar: built once)."""
    return ", ".join("rgb({},{},{}) {}%".format(
        *(int(255 * v) for v in matplotlib.colormaps[cmap](t)[:3]), int(round(100 * t)))
        for t in np.linspace(0, 1, 11))


def colorbar_html(vmin: float, vmax: float, *, cmap: str = "viridis", label: str = "",
                  low_text: str | None = None, high_text: str | None = None,
                  width: int = 220) -> str:
    """A horizontal colour bar (a CSS gradient of ``cmap``) with its end values and a label."""
    stops = _gradient(cmap)
    low = number(vmin) if low_text is None else low_text
    high = number(vmax) if high_text is None else high_text
    return ('<div class="usae-colorbar" style="display:inline-flex;align-items:center;'
            f'gap:6px;font-size:13px">{html.escape(label)} <span>{html.escape(low)}</span>'
            f'<span style="display:inline-block;width:{width}px;height:12px;'
            f'background:linear-gradient(to right, {stops})"></span>'
            f'<span>{html.escape(high)}</span></div>')
