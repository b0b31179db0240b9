"""Update time of every explorer control (issue 14: each update <= 1 s on the default run).

Builds the explorer widget on the default run's held-out split (1,000 images, three models,
n=256; ``results/offline`` or ``--out``) the way notebook 06 does, then times each control's
update (a change of its value, through the widget's observers, to the redrawn HTML): select a
concept, sort change, image count change, id search, image pick, translation. Without a run
it uses a synthetic one of the same size (codes and activations random, images grey), so the
numbers still cover the code paths. Prints the median and maximum over ``--repeats``.

    python benchmarks/explorer_latency.py --out results/offline --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import usae_analysis as analysis  # noqa: E402
import usae_core as core  # noqa: E402
import usae_explorer as ex  # noqa: E402


def real_explorer(out: str) -> tuple[ex.ConceptExplorer, str]:
    import usae_pipeline as pipeline

    exp, caches, model, source = pipeline.open_run({"out": out})
    val = pipeline.encoded_split(exp, model, caches, "val")
    stats = analysis.concept_statistics(val.codes)
    explorer = ex.ConceptExplorer.from_cache(caches["val"], val.codes, model=model, stats=stats,
                                             top_n=4)
    return explorer, source


def synthetic_explorer(n_images: int = 1000) -> tuple[ex.ConceptExplorer, str]:
    from PIL import Image

    dims, tokens = {"a": 384, "b": 1280, "c": 1280}, 196
    model = core.USAE(dims, 256, 32, seed=0)
    generator = torch.Generator().manual_seed(0)
    model.fit_standardization({n: torch.randn(256, d, generator=generator)
                               for n, d in dims.items()}, centre_channels=True)
    acts = {n: np.random.default_rng(i).standard_normal((n_images * tokens, d), np.float32)
            .astype(np.float16) for i, (n, d) in enumerate(dims.items())}
    codes = analysis.encode_dataset(model, ({n: torch.from_numpy(v[s:s + 16384]).float()
                                             for n, v in acts.items()}
                                            for s in range(0, n_images * tokens, 16384))).codes
    images = [Image.new("RGB", (300, 200), (i % 256, 90, 140)) for i in range(n_images)]
    explorer = ex.ConceptExplorer(
        codes, images, analysis.concept_statistics(codes), top_n=4, model=model,
        activations=lambda i: {n: v[i * tokens:(i + 1) * tokens].astype(np.float32)
                               for n, v in acts.items()})
    return explorer, f"synthetic: {n_images} images, n=256, k=32, random codes"


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"
                                             / "offline"), help="the run's output folder")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if (Path(args.out) / "usae.safetensors").is_file():
        explorer, source = real_explorer(args.out)
    else:
        print(f"no run at {args.out}: a synthetic one of the same size")
        explorer, source = synthetic_explorer()
    start = time.perf_counter()
    explorer.widget()
    print(f"{source}\nwidget built (first concept, image and translation drawn) in "
          f"{time.perf_counter() - start:.2f} s")
    c = explorer.controls
    order = explorer.concept_order("energy")
    keys = list(ex.SORT_KEYS)
    labels = [explorer.image_label(i).split(" ", 1)[-1] for i in range(explorer.n_images)]
    times: dict[str, list[float]] = {name: [] for name in (
        "select concept", "sort change", "count change", "id search", "image search",
        "image pick", "translation (A, B)", "nearest: dictionary", "image-tab concept click")}
    rng = np.random.default_rng(0)
    for repeat in range(args.repeats):
        # a concept not shown before: nothing cached for it
        concept = int(order[min(len(order) - 1, 10 + 7 * repeat)])
        times["select concept"].append(timed(lambda: setattr(c.concept, "value", concept)))
        key = keys[(repeat + 1) % len(keys)]
        times["sort change"].append(timed(lambda: setattr(c.sort, "value", key)))
        count = {4: 8, 8: 12}.get(c.count.value, 4)  # 4 -> 8 -> 12 (the slider's top) -> 4
        times["count change"].append(timed(lambda: setattr(c.count, "value", count)))
        target = str(int(order[min(len(order) - 1, 60 + 5 * repeat)]))
        times["id search"].append(timed(lambda: setattr(c.search, "value", target)))
        word = labels[int(rng.integers(len(labels)))][:4] or "a"
        times["image search"].append(timed(lambda: setattr(c.image_search, "value", word)))
        image = int(rng.integers(explorer.n_images))
        times["image pick"].append(timed(lambda: setattr(c.image, "value", image)))
        pair = explorer.names[repeat % len(explorer.names)]
        times["translation (A, B)"].append(timed(lambda: setattr(c.source, "value", pair)))
        if "dictionary cosine" in c.nearest_by.options:
            by = "dictionary cosine" if c.nearest_by.value == "co-firing" else "co-firing"
            times["nearest: dictionary"].append(timed(lambda: setattr(c.nearest_by, "value", by)))
        buttons = c.image_concepts.children[1].children[1:]
        if buttons:
            times["image-tab concept click"].append(timed(buttons[0].click))
    print(f"\n{'control':<26}{'median s':>10}{'max s':>10}  (n={args.repeats}; shared CPU)")
    for name, values in times.items():
        if values:
            print(f"{name:<26}{statistics.median(values):>10.3f}{max(values):>10.3f}")


if __name__ == "__main__":
    main()
