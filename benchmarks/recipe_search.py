"""Choose the offline training recipe on a split of the TRAINING images only. Prints a table.

    python benchmarks/recipe_search.py --cache results/offline/caches/train --recipes baseline,unit
    python benchmarks/recipe_search.py --cache ... --recipes all --independent

The training cache's images are split by image (every fifth image held out, so every class is
on both sides); each recipe trains a USAE on the rest and is scored on the held-out fifth with
the same functions that write ``metrics.json``: self- and cross-R^2 (paper form), mean co-fire
proportion of the top concepts by energy, the share of live concepts with firing entropy >= 0.95,
dead concepts, and the median cosine of each dictionary row to its initial row. With
``--independent`` one single-model SAE per model is trained with the same recipe and the USAE's
dictionaries are matched to them (share with cosine > 0.5, AUC against its random baseline).
The held-out validation images of the default run are never read. Not run by the tests.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import usae_analysis as analysis  # noqa: E402
import usae_cache  # noqa: E402
import usae_checkpoint  # noqa: E402
import usae_core as core  # noqa: E402
import usae_loader  # noqa: E402

BASE = dict(n_concepts=1024, k=16, batch_tokens=1024, epochs=10.0, centre=False,
            train=dict(lr=1e-3))
RECIPES = {  # name -> changes to BASE (train options merge into BASE["train"])
    "baseline": {},
    "unit": {"train": {"dictionary_init": "unit"}},
    "unit_tied": {"train": {"dictionary_init": "unit", "encoder_init": "transpose"}},
    "tokens_tied": {"train": {"dictionary_init": "tokens", "encoder_init": "transpose"}},
    "unit_centre": {"centre": True, "train": {"dictionary_init": "unit"}},
    "unit_tied_centre": {"centre": True,
                         "train": {"dictionary_init": "unit", "encoder_init": "transpose"}},
    "tokens_tied_centre": {"centre": True,
                           "train": {"dictionary_init": "tokens", "encoder_init": "transpose"}},
    "unit_centre_mse": {"centre": True, "train": {"dictionary_init": "unit", "loss": "mse"}},
    "unit_centre_alldec": {"centre": True,
                           "train": {"dictionary_init": "unit", "update": "all_decoders"}},
    # The offline default (usae_pipeline's sizes and OFFLINE_RECIPE).
    "offline": {"n_concepts": 256, "k": 32, "epochs": 80.0, "centre": True,
                "train": {"dictionary_init": "unit", "loss": "mse", "sparse_decode": True}},
}


def recipe(name: str, overrides: dict) -> dict:
    """BASE with a named recipe's changes, then ``overrides`` (``key=value`` from the CLI)."""
    spec = json.loads(json.dumps(BASE))
    changes = json.loads(json.dumps(RECIPES[name]))
    spec["train"].update(changes.pop("train", {}))
    spec.update(changes)
    for key, value in overrides.items():
        (spec if key in spec else spec["train"])[key] = value
    return spec


class Batches:
    """Shuffled batches of the given rows, a new permutation per epoch (re-iterable)."""

    def __init__(self, acts: dict[str, torch.Tensor], rows: np.ndarray, batch: int, seed: int):
        self.acts, self.rows, self.batch, self.seed, self.epoch = acts, rows, batch, seed, 0

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.rows)
        self.epoch += 1
        for i in range(0, len(order) - self.batch + 1, self.batch):
            chosen = torch.from_numpy(np.sort(order[i:i + self.batch]))
            yield {name: a[chosen] for name, a in self.acts.items()}


def train_model(names, acts, rows, spec, stats, means, seed) -> tuple[core.USAE, list[dict]]:
    model = core.USAE({n: acts[n].shape[1] for n in names}, spec["n_concepts"], spec["k"],
                      seed=seed)
    model.set_standardization({n: stats[n] for n in names},
                              {n: means[n] for n in names} if spec["centre"] else None)
    steps = int(spec["epochs"] * len(rows) / spec["batch_tokens"])
    result = usae_checkpoint.train(model, Batches({n: acts[n] for n in names}, rows,
                                                  spec["batch_tokens"], seed),
                                   steps, seed=seed, progress=False, log_every=max(1, steps // 20),
                                   **spec["train"])
    return model, result.history


def evaluate(model: core.USAE, acts, rows) -> dict:
    chunks = [{n: acts[n][torch.from_numpy(rows[i:i + 196 * 50])] for n in model.names}
              for i in range(0, len(rows), 196 * 50)]
    encoded = analysis.encode_dataset(model, chunks)
    stats = analysis.concept_statistics(encoded.codes)
    universality = analysis.universality(stats, analysis.dictionary_norms(model))
    entropy = torch.tensor(universality["firing_entropy"])
    aggregate = analysis.aggregate_energy(torch.tensor(
        [universality["energy"][n] for n in model.names]))
    ranked = analysis.top_concepts(aggregate, min(1000, len(aggregate)))
    live = stats.fires.sum(dim=0) > 0
    pairs = {}
    for a, b in itertools.combinations(model.names, 2):
        pair = analysis.concept_statistics({a: encoded.codes[a], b: encoded.codes[b]})
        proportion = analysis.cofire_proportion(pair.fires, pair.cofires)
        pairs[f"{a[:4]}-{b[:4]}"] = round(float(proportion[0, ranked].mean()), 3)
    r2 = np.array(encoded.reconstruction.r2_paper)
    off = ~np.eye(len(r2), dtype=bool)
    return {"self_r2": np.diag(r2).round(3).tolist(), "cross_r2_min": float(r2[off].min()),
            "cross_r2_mean": float(r2[off].mean()),
            "cfp": [round(v, 3) for v in universality["cofire_proportion_top1000"].values()],
            "pair_cfp": pairs,
            "fe_top_share": float((entropy[live] >= 0.95).double().mean()),
            "dead": universality["dead_fraction"]["all"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="the training activation cache folder")
    parser.add_argument("--recipes", default="baseline,unit",
                        help=f"comma-separated, or 'all': {', '.join(RECIPES)}")
    parser.add_argument("--set", default="{}", help='JSON overrides, e.g. \'{"epochs": 20}\'')
    parser.add_argument("--independent", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default=None, help="append one JSON line per recipe here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cache = usae_cache.open_cache(args.cache)
    names = cache.names
    acts = {n: torch.from_numpy(np.asarray(cache.arrays[n], dtype=np.float32)) for n in names}
    image = cache.image_of_row()
    held_out = np.flatnonzero(image % 5 == 4)
    train_rows = np.flatnonzero(image % 5 != 4)
    stats = cache.standardization
    means = usae_loader.channel_means(cache)
    chosen = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
    print(f"{cache.path}: {len(train_rows)} training tokens, {len(held_out)} held-out tokens "
          f"(every fifth training image), models {names}", flush=True)
    rows = []
    for name in chosen:
        spec = recipe(name, json.loads(args.set))
        start = time.perf_counter()
        model, history = train_model(names, acts, train_rows, spec, stats, means, args.seed)
        row = {"recipe": name, "spec": spec, **evaluate(model, acts, held_out),
               "cos_to_init": [round(v, 3) for v in history[-1]["dictionary_cosine_to_init"]
                               .values()],
               "train_s": round(time.perf_counter() - start)}
        if args.independent:
            shares, ratios = [], []
            for offset, model_name in enumerate(names):
                sae, _ = train_model([model_name], acts, train_rows, spec, stats, means,
                                     args.seed + 100 + offset)
                matched = analysis.consistency(model.dictionary(model_name),
                                               sae.dictionary(model_name), seed=args.seed)
                shares.append(round(matched["share_gt_0_5"], 3))
                ratios.append(round(matched["auc"] / matched["random_baseline_auc"], 2))
            row.update(match_share=shares, auc_ratio=ratios)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "spec"}), flush=True)
        if args.log:
            with open(args.log, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    keys = ["self_r2", "cross_r2_min", "cfp", "pair_cfp", "fe_top_share", "dead", "cos_to_init",
            "match_share", "auc_ratio", "train_s"]
    print("| recipe | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 1))
    for row in rows:
        cells = [row.get(k, "") for k in keys]
        print(f"| {row['recipe']} | " + " | ".join(
            f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
