"""The concept explorer's ipywidgets layer: three tabs over a :class:`usae_explorer.ConceptExplorer`.

* **concept**: sort order, concept id search, dropdown and rank slider (kept in step), images
  per model; the concept's statistics, one row per model of its top images (the raw image
  beside its heatmap overlay, on one colour scale shared by all models, with its colour bar),
  each model's activation histogram, and the nearest concepts as buttons.
* **image**: a label search filtering a list and thumbnails of the matches; the chosen image,
  its top concepts per model as buttons that open the concept tab, and their heatmaps on it.
* **translation**: models A and B; B's per-patch R² map of decode_B(encode_A(a)) on the chosen
  image, with its colour bar and the image-level R² into every model.

Everything shown is HTML built by the pure functions below (``concept_rows_html``,
``histograms_html``, ``image_heatmaps_html``, ``translation_html``) from the explorer's
answers, and images are inline ``<img>`` tags sized in pixels, so they stay readable at any
count and tests read the HTML without a browser. Imports ``usae_explorer`` and
``usae_heatmaps``; ipywidgets only when a widget is built.
"""
from __future__ import annotations

import contextlib
import functools
import html
import io
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

import usae_explorer as ex
import usae_heatmaps as hm
from usae_heatmaps import fixed, number

TEXT = "font-size:13px;line-height:1.35"
SHARE_COLOURS = {hm.SHARED_ALL: "#ffbb78", hm.SHARED_SOME: "#98df8a", hm.UNSHARED: "#dddddd"}


@contextlib.contextmanager
def one_thread():
    """torch on one thread while a view updates, then as it was. The updates' tensors are small
    (one image's tokens, a few heatmaps), and on a busy CPU every parallel op waits for a second
    thread to be scheduled: profiled on the default run (2 cores, shared), one image's
    translation took 200 ms on two threads and 8 ms on one, a 196-token encode 115 and 4 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def on_one_thread(action):
    """``action`` run under :func:`one_thread` (a widget callback)."""
    @functools.wraps(action)
    def run(*args, **kwargs):
        with one_thread():
            return action(*args, **kwargs)
    return run


class Pictures:
    """Squashed images and their ``<img>`` tags by image index, kept for the ``keep`` most
    recent images: a concept's raw images and the image tab's picture are encoded once."""

    def __init__(self, explorer: ex.ConceptExplorer, size: int, keep: int = 256):
        self.explorer, self.size, self.keep = explorer, size, keep
        self._arrays: dict[int, np.ndarray] = {}
        self._tags: dict[tuple[int, int], str] = {}

    def array(self, image: int) -> np.ndarray:
        if image not in self._arrays:
            if len(self._arrays) >= self.keep:
                self._arrays.pop(next(iter(self._arrays)))
            self._arrays[image] = hm.squash(self.explorer.images[int(image)], self.size)
        return self._arrays[image]

    def tag(self, image: int, width: int) -> str:
        if (image, width) not in self._tags:
            if len(self._tags) >= self.keep:
                self._tags.pop(next(iter(self._tags)))
            self._tags[image, width] = hm.image_tag(self.array(image), width=width,
                                                    title=self.explorer.image_label(image))
        return self._tags[image, width]

    def thumbnail(self, image: int, size: int = 72) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(self.array(image)).resize((size, size)).save(buffer, format="JPEG")
        return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# HTML of the views (pure: explorer in, text out)


def concept_header_html(explorer: ex.ConceptExplorer, concept: int, vmax: float) -> str:
    """Title, statistics table and the colour bar of the shared scale."""
    bar = hm.colorbar_html(0.0, vmax, label="code (one scale for all models):") if vmax > 0 \
        else "<i>no shown image has a positive code</i>"
    return (f'<div style="{TEXT}">{explorer.stats_html(concept)}'
            f'<div style="margin:4px 0">{bar}</div></div>')


def concept_scale(explorer: ex.ConceptExplorer, concept: int) -> tuple[float, dict]:
    """The concept's largest code over every shown image of every model, and the heatmaps
    (model -> ``images x grid x grid``) it was taken from."""
    maps = {name: explorer.heatmaps(concept, name, chosen)
            for name, (chosen, _) in explorer.top_images(concept).items()}
    vmax = max([float(m.max()) for m in maps.values() if m.size] + [0.0])
    return vmax, maps


def concept_rows_html(explorer: ex.ConceptExplorer, concept: int, pictures: Pictures,
                      image_px: int, vmax: float, maps: dict) -> dict[str, str]:
    """Model -> one row: its statistics, then each top image raw beside its overlay, with
    label, mean and max code; a model where the concept never shows says so."""
    shown = {name: [int(i) for i in chosen] for name, (chosen, _) in
             explorer.top_images(concept).items()}
    names = list(shown)  # every model's overlays in one batch, then split by model
    batch = hm.overlays([pictures.array(i) for n in names for i in shown[n]],
                        np.concatenate([maps[n] for n in names]), pictures.size, vmax=vmax)
    mixed = dict(zip(names, np.split(batch, np.cumsum([len(shown[n]) for n in names])[:-1])))
    rows = {}
    for row in explorer.concept_info(concept)["models"]:
        name = row["model"]
        chosen, scores = explorer.top_images(concept)[name]
        head = (f'<div style="font-size:14px"><b>{html.escape(name)}</b> · fires '
                f'{row["fires"]:,} tokens · energy {number(row["energy"])} · co-fire prop. '
                f'{fixed(row["cofire_proportion"])} (chance {fixed(row["cofire_chance"])})</div>')
        if not len(chosen):  # nothing to draw: say so rather than leave a blank row
            tokens = len(explorer.codes[name])
            rows[name] = (f'<div style="{TEXT};margin:8px 0">{head}<div class="usae-note" '
                          f'style="color:#a33;padding:6px 0">concept {concept} never fires in '
                          f'{html.escape(name)}: its code is 0 on all {tokens:,} tokens of the '
                          f'{explorer.n_images:,} images.</div></div>')
            continue
        cells = []
        for image, score, heat, picture in zip(shown[name], scores, maps[name], mixed[name]):
            cells.append(
                '<figure style="margin:0">'
                f'<div style="display:flex;gap:2px">{pictures.tag(image, image_px)}'
                f'{hm.image_tag(picture, width=image_px, title=f"concept {concept} on #{image}")}'
                f'</div><figcaption style="{TEXT};max-width:{2 * image_px}px">'
                f'{html.escape(explorer.image_label(image))} · mean {fixed(score, 3)} · max '
                f'{number(heat.max())}</figcaption></figure>')
        rows[name] = (f'<div style="{TEXT};margin:8px 0">{head}<div style="display:flex;'
                      f'flex-wrap:wrap;gap:12px">{"".join(cells)}</div></div>')
    return rows


def histogram_svg(edges: np.ndarray, counts: np.ndarray, *, title: str, width: int = 260,
                  height: int = 80, colour: str = "#3b6ea8") -> str:
    """A bar chart of one histogram as inline SVG; bar heights are log(1 + count) so rare
    strong codes stay visible beside thousands of weak ones."""
    heights = np.log1p(np.asarray(counts, dtype=np.float64))
    scale = (height - 4) / heights.max() if heights.max() > 0 else 0.0
    step = width / len(counts)
    bars = "".join(f'<rect x="{i * step:.1f}" y="{height - h * scale:.1f}" '
                   f'width="{max(step - 1, 1):.1f}" height="{h * scale:.1f}" fill="{colour}">'
                   f'<title>{number(edges[i])}–{number(edges[i + 1])}: {int(c):,}</title></rect>'
                   for i, (h, c) in enumerate(zip(heights, counts)))
    return (f'<div style="{TEXT}"><div>{html.escape(title)}</div>'
            f'<svg width="{width}" height="{height}" style="background:#f6f6f6">{bars}</svg>'
            f'<div style="display:flex;justify-content:space-between;width:{width}px">'
            f'<span>0</span><span>code</span><span>{number(edges[-1])}</span></div></div>')


def histograms_html(explorer: ex.ConceptExplorer, concept: int, bins: int = 24) -> str:
    """Each model's histogram of the concept's positive codes, on shared bins."""
    found = explorer.histograms(concept, bins)
    parts = [histogram_svg(found.edges, counts, title=f"{name}: {int(counts.sum()):,} tokens "
                           "with code > 0 (log count)") for name, counts in found.counts.items()]
    return ('<div style="display:flex;flex-wrap:wrap;gap:18px;margin:6px 0">'
            + "".join(parts) + "</div>")


def image_heatmaps_html(explorer: ex.ConceptExplorer, image: int, concepts: list[int],
                        pictures: Pictures, image_px: int) -> str:
    """One row per concept: its heatmap on ``image`` in every model, on one scale per concept
    (its largest code on this image over the models), with that scale's colour bar."""
    rows, names = [], explorer.names
    found = {c: {n: explorer.heatmaps(c, n, [image])[0] for n in names} for c in concepts}
    scales = {c: max(float(m.max()) for m in found[c].values()) for c in concepts}
    pairs = [(c, n) for c in concepts for n in names]  # one batch, each on its concept's scale
    batch = iter(hm.overlays([pictures.array(image)] * len(pairs),
                             np.array([found[c][n] for c, n in pairs]).reshape(
                                 -1, explorer.grid, explorer.grid),
                             pictures.size, vmax=[scales[c] for c, _ in pairs]))
    for concept in concepts:
        maps, vmax = found[concept], scales[concept]
        tags = {name: hm.image_tag(next(batch), width=image_px, title=name) for name in names}
        cells = "".join(
            f'<figure style="margin:0">{tags[name]}'
            f'<figcaption style="{TEXT}">{html.escape(name)} · max {number(m.max())}'
            '</figcaption></figure>' for name, m in maps.items())
        bar = hm.colorbar_html(0.0, vmax, width=120) if vmax > 0 else ""
        rows.append(f'<div style="{TEXT};margin:6px 0"><b>concept {concept}</b> {bar}'
                    f'<div style="display:flex;gap:8px;flex-wrap:wrap">{cells}</div></div>')
    return "".join(rows)


def translation_html(explorer: ex.ConceptExplorer, image: int, source: str, target: str,
                     pictures: Pictures, image_px: int) -> str:
    """The image, B's per-patch R² map (0 to 1, clipped; grey where no token was kept) with
    its colour bar, the image-level R² of A into B and into every other model."""
    if explorer.model is None or explorer.activations is None:
        return (f'<div style="{TEXT}" class="usae-note">The translation view needs the USAE '
                "and the image activations: build the explorer with "
                "<code>ConceptExplorer.from_cache(cache, codes, model=model)</code>.</div>")
    grid, result = explorer.translation_map(image, source, target)
    picture = hm.colour_map(grid, 0.0, 1.0, size=pictures.size)
    others = " · ".join(
        f"{html.escape(name)} {fixed(explorer.translation_map(image, source, name)[1].image_r2)}"
        for name in explorer.names)
    bar = hm.colorbar_html(0.0, 1.0, label="per-patch R²:", low_text="≤ 0", high_text="1")
    return (f'<div style="{TEXT}"><div style="font-size:14px">'
            f'{html.escape(explorer.image_label(image))}: encode with <b>{html.escape(source)}'
            f'</b>, decode into <b>{html.escape(target)}</b> · image R² '
            f'<b>{fixed(result.image_r2)}</b></div>'
            f'<div style="display:flex;gap:6px;margin:6px 0">{pictures.tag(image, image_px)}'
            f'{hm.image_tag(picture, width=image_px, fmt="png", title="per-patch R²")}</div>'
            f'{bar}<div>image R² from {html.escape(source)} into each model: {others}</div>'
            "<div>R² = 1 − ‖b − b̂‖² / ‖b − b̄‖², b̄ the target's mean token from the USAE's "
            "standardisation.</div></div>")


# ----------------------------------------------------------------------------------------------
# The widgets


class ExplorerWidget:
    """The three tabs (``.tabs``) and their controls (``.controls``) over ``explorer``.

    Parameters
    ----------
    image_px : int
        Width in pixels of each shown image (the raw one and its overlay each).
    thumbnails : int
        Thumbnails shown for the image search's first matches.
    nearest : int
        Nearest concepts listed.
    heat_concepts : int
        Concepts per model whose heatmaps the image tab draws on the image.
    """

    def __init__(self, explorer: ex.ConceptExplorer, *, image_px: int = 176,
                 thumbnails: int = 12, nearest: int = 8, heat_concepts: int = 3):
        import ipywidgets as w

        if explorer.n_images == 0 or not len(explorer.concept_order()):
            raise ValueError("no concept fires in any model: the explorer has nothing to show.")
        self.w, self.x, self.image_px = w, explorer, int(image_px)
        self.n_thumbnails, self.n_nearest, self.heat_concepts = thumbnails, nearest, heat_concepts
        self.pictures = Pictures(explorer, 224)
        self.order = explorer.concept_order("energy")
        self._syncing, self.shown = False, None
        self._pools: dict[tuple, list] = {}  # buttons and rows made once, reused (_buttons)
        narrow = {"width": "auto"}
        c = SimpleNamespace(
            sort=w.Dropdown(options=list(ex.SORT_KEYS), value="energy", description="sort by"),
            search=w.Text(placeholder="concept id, e.g. 801", description="find id",
                          continuous_update=False),
            status=w.HTML(),
            concept=w.Dropdown(options=explorer.concept_labels("energy"), description="concept",
                               layout={"width": "420px"}),
            rank=w.IntSlider(min=0, max=max(len(self.order) - 1, 0), description="rank",
                             continuous_update=False),
            count=w.IntSlider(value=explorer.top_n, min=1, max=12, description="images",
                              continuous_update=False),
            nearest_by=w.ToggleButtons(options=list(ex.NEAREST_BY) if explorer.model is not None
                                       else ["co-firing"], description="nearest by"),
            header=w.HTML(), histograms=w.HTML(),
            rows=w.VBox(), nearest=w.HBox(layout={"flex_flow": "row wrap"}),
            image_search=w.Text(placeholder="label, e.g. dog, or #index",
                                description="find image", continuous_update=False),
            image_list=w.Select(rows=6, layout={"width": "420px"}),
            thumbnails=w.HBox(layout={"flex_flow": "row wrap"}),
            image=w.IntSlider(min=0, max=explorer.n_images - 1, description="image",
                              continuous_update=False),
            image_header=w.HTML(), image_concepts=w.VBox(), image_heatmaps=w.HTML(),
            source=w.Dropdown(options=explorer.names, value=explorer.names[0],
                              description="encode A"),
            target=w.Dropdown(options=explorer.names, value=explorer.names[-1],
                              description="decode B"),
            translation=w.HTML())
        c.concept_view = w.VBox([c.header, c.histograms, w.HTML("<b>nearest concepts</b>"),
                                 c.nearest, c.rows])
        c.image_view = w.VBox([c.image_header, c.image_concepts, c.image_heatmaps])
        self.controls = c
        for control, action in (  # every update with torch on one thread (one_thread)
                (c.sort, self._on_sort), (c.search, self._on_search),
                (c.concept, lambda change: self.select(change["new"])),
                (c.rank, lambda change: self.select(int(self.order[change["new"]]))),
                (c.count, self._on_count), (c.nearest_by, lambda _: self.render_nearest()),
                (c.image_search, lambda _: self.filter_images()), (c.image_list, self._on_pick),
                (c.image, lambda _: self.render_image()),
                (c.source, lambda _: self.render_translation()),
                (c.target, lambda _: self.render_translation())):
            control.observe(on_one_thread(action), names="value")
        self.tabs = w.Tab(children=[
            w.VBox([w.HBox([c.sort, c.concept]), w.HBox([c.search, c.status]),
                    w.HBox([c.rank, c.count]), c.nearest_by, c.concept_view]),
            w.VBox([w.HBox([c.image_search, c.image_list]), c.thumbnails, c.image,
                    c.image_view]),
            w.VBox([w.HBox([c.source, c.target], layout=narrow), c.translation])],
            titles=("concept", "image", "translation"))
        with one_thread():
            self.render_concept()
            self.filter_images()
            self.render_image()

    # -- concept tab -------------------------------------------------------------------------
    def select(self, concept: int | None, *, redraw: bool = False) -> None:
        """Make ``concept`` current in the dropdown and the rank slider, then draw it unless
        it is already shown (``redraw`` draws anyway)."""
        if self._syncing or concept is None:
            return
        concept = int(concept)
        self._syncing = True
        try:
            self.controls.concept.value = concept
            self.controls.rank.value = int(np.flatnonzero(self.order == concept)[0])
        finally:
            self._syncing = False
        if redraw or concept != self.shown:
            self.render_concept()

    def _on_sort(self, change) -> None:
        """A new order: re-rank the list and jump to its top concept."""
        self.order = self.x.concept_order(change["new"])
        self._syncing = True  # new options reset the dropdown: do not render the interim value
        try:
            self.controls.concept.options = self.x.concept_labels(change["new"])
            self.controls.rank.max = max(len(self.order) - 1, 0)
        finally:
            self._syncing = False
        self.select(int(self.order[0]), redraw=True)

    def _on_search(self, change) -> None:
        if not change["new"].strip():
            return
        try:
            concept = self.x.find_concept(change["new"])
        except ValueError as error:
            self.controls.status.value = f'<span style="color:#a33">{html.escape(str(error))}</span>'
            return
        self.controls.status.value = ""
        self.select(concept)

    def _on_count(self, change) -> None:
        self.x.set_top_n(change["new"])
        self.render_concept()

    def render_concept(self) -> None:
        concept = self.controls.concept.value
        vmax, maps = concept_scale(self.x, concept)
        self.controls.header.value = concept_header_html(self.x, concept, vmax)
        self.controls.histograms.value = histograms_html(self.x, concept)
        rows = concept_rows_html(self.x, concept, self.pictures, self.image_px, vmax, maps)
        self.controls.rows.children = [self.w.HTML(text) for text in rows.values()]
        self.shown = concept
        self.render_nearest()

    def render_nearest(self) -> None:
        found = self.x.nearest(self.controls.concept.value, self.controls.nearest_by.value,
                               self.n_nearest)
        buttons = self._buttons(("nearest",), len(found))
        for button, near in zip(buttons, found):
            button.concept, button.description = near.concept, f"{near.concept} · " \
                f"{fixed(near.score)}"
            button.tooltip = (f"concept {near.concept}: score {fixed(near.score, 3)}, fire "
                              f"together on {near.together:,} tokens")
        self.controls.nearest.children = buttons or [self.w.HTML("<i>none</i>")]

    def _buttons(self, pool: tuple, count: int) -> list:
        """``count`` buttons of ``pool``, made once and then reused (each new widget costs
        milliseconds here and a message to the browser); a click opens ``button.concept``."""
        buttons = self._pools.setdefault(pool, [])
        while len(buttons) < count:
            button = self.w.Button(layout={"width": "auto"})
            button.on_click(on_one_thread(lambda button: self.open_concept(button.concept)))
            buttons.append(button)
        return buttons[:count]

    def open_concept(self, concept: int) -> None:
        """Show ``concept`` in the concept tab (from a nearest or an image-tab button)."""
        if not self.x.live[concept]:  # listed concepts only: it must be in the dropdown
            self.controls.status.value = f"concept {concept} never fires: not listed."
            return
        self.tabs.selected_index = 0
        self.select(concept)

    # -- image tab ---------------------------------------------------------------------------
    def filter_images(self) -> None:
        """The list and thumbnails of the images matching the label search."""
        found = self.x.search_images(self.controls.image_search.value, limit=500)
        self._syncing = True  # new options must not pick an image by themselves
        try:
            self.controls.image_list.options = [(self.x.image_label(int(i)), int(i))
                                                for i in found]
            self.controls.image_list.value = None
        finally:
            self._syncing = False
        cards = []
        for i in found[:self.n_thumbnails]:
            button = self.w.Button(description=f"#{int(i)}", layout={"width": "76px"})
            button.on_click(on_one_thread(lambda _, image=int(i): self.pick(image)))
            cards.append(self.w.VBox([self.w.Image(value=self.pictures.thumbnail(int(i)),
                                                   format="jpeg", width=72, height=72), button]))
        self.controls.thumbnails.children = cards or [self.w.HTML("<i>no image matches</i>")]

    def _on_pick(self, change) -> None:
        if not self._syncing and change["new"] is not None:
            self.pick(change["new"])

    def pick(self, image: int) -> None:
        self.controls.image.value = int(image)  # its observer redraws

    def render_image(self) -> None:
        image = self.controls.image.value
        found = self.x.image_concepts(image)
        self.controls.image_header.value = (
            f'<div style="{TEXT};font-size:14px"><b>{html.escape(self.x.image_label(image))}</b>'
            f'</div>{self.pictures.tag(image, self.image_px)}')
        if ("rows",) not in self._pools:  # the legend, then a row per model: made once
            self._pools["rows",] = [self.w.HTML(
                f'<div style="{TEXT}">concept · mean code on this image; colour: '
                '<span style="background:#ffbb78">fires in all models</span> '
                '<span style="background:#98df8a">in some</span> '
                '<span style="background:#dddddd">this model only</span></div>')] + [
                self.w.HBox([self.w.HTML(f"<b>{html.escape(name)}</b>",
                                         layout={"width": "180px"})],
                            layout={"flex_flow": "row wrap"}) for name in found.per_model]
        rows = self._pools["rows",]
        for row, (name, pairs) in zip(rows[1:], found.per_model.items()):
            buttons = self._buttons(("image", name), len(pairs))
            for button, (concept, mean) in zip(buttons, pairs):
                share = (hm.SHARED_ALL if len(found.shared.get(concept, ())) == found.n_models
                         else hm.SHARED_SOME if concept in found.shared else hm.UNSHARED)
                button.concept, button.description = concept, f"{concept} · {fixed(mean, 3)}"
                button.tooltip = f"open concept {concept}"
                button.style.button_color = SHARE_COLOURS[share]
            row.children = [row.children[0], *buttons]
        self.controls.image_concepts.children = rows
        heat = list(dict.fromkeys(c for pairs in found.per_model.values()
                                  for c, _ in pairs[:self.heat_concepts]))
        self.controls.image_heatmaps.value = image_heatmaps_html(self.x, image, heat,
                                                                 self.pictures, self.image_px)
        self.render_translation()

    # -- translation tab ---------------------------------------------------------------------
    def render_translation(self) -> None:
        c = self.controls
        c.translation.value = translation_html(self.x, c.image.value, c.source.value,
                                               c.target.value, self.pictures, self.image_px)

    def concept_html(self) -> str:
        """Everything the concept tab shows, as one string (for tests and saving)."""
        c = self.controls
        return c.header.value + c.histograms.value + "".join(r.value for r in c.rows.children)
