"""How much of one model's tokens can another model's tokens explain at all? Prints two tables.

    python benchmarks/cross_model_ceiling.py --cache results/offline/caches/train
    python benchmarks/cross_model_ceiling.py --cache ... --metrics results/offline/metrics.json

A USAE's cross reconstruction (encode with model i, decode into model j) is a sparse, almost
linear map from i's tokens to j's. Its held-out R^2 is bounded in practice by what the best
*linear* map can do: ridge regression from i's standardised tokens to j's, fitted on four training
images in five and scored on the fifth (every fifth image, so every class is on both sides;
paper-form R^2, i.e. against one scalar mean). The second table is the compressibility of each
model's tokens: the share of their variance in the first 16/32/64/128 principal components (a
TopK code with k active concepts per token is a union of k-dimensional pieces, so a model whose
variance is spread over many directions reconstructs worse at the same k). With ``--metrics``,
the USAE's own cross R^2 (held-out validation images) is shown beside the ridge ceiling.
Only the training cache is read. Not run by the tests.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import usae_cache  # noqa: E402


def ridge_r2(source: torch.Tensor, target: torch.Tensor, train: torch.Tensor,
             strength: float) -> float:
    """Held-out paper-form R^2 of a ridge map from ``source`` to ``target`` rows.

    ``strength`` scales the penalty by the mean variance of the centred source features, so
    one value means the same for every model.
    """
    x, y = source[train].double(), target[train].double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    x = x - x_mean
    gram = x.T @ x
    penalty = strength * torch.diagonal(gram).mean()
    weights = torch.linalg.solve(gram + penalty * torch.eye(len(gram), dtype=gram.dtype),
                                 x.T @ (y - y_mean))
    held = ~train
    predicted = (source[held].double() - x_mean) @ weights + y_mean
    truth = target[held].double()
    return float(1 - (truth - predicted).square().sum() / (truth - truth.mean()).square().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a training activation cache")
    parser.add_argument("--metrics", default=None, help="a run's metrics.json (optional)")
    parser.add_argument("--strength", type=float, default=1e-2, help="ridge penalty (relative)")
    args = parser.parse_args()
    cache = usae_cache.open_cache(args.cache)
    names = cache.names
    acts = {n: torch.from_numpy(np.asarray(cache.arrays[n], dtype=np.float32)) for n in names}
    train = torch.from_numpy(cache.image_of_row() % 5 != 4)
    usae = None
    if args.metrics:
        metrics = json.loads(Path(args.metrics).read_text())
        usae = np.array(metrics["r2_paper"])
    print(f"{cache.path}: {int(train.sum())} training tokens, {int((~train).sum())} held-out "
          f"tokens (every fifth image), ridge strength {args.strength}\n")
    header = ["source → target", "ridge R²"] + (["USAE cross R² (val)"] if usae is not None
                                                 else [])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for i, source in enumerate(names):
        for j, target in enumerate(names):
            if i == j:
                continue
            cells = [f"{source} → {target}",
                     f"{ridge_r2(acts[source], acts[target], train, args.strength):.3f}"]
            if usae is not None:
                cells.append(f"{usae[i, j]:.3f}")
            print("| " + " | ".join(cells) + " |", flush=True)
    print("\n| model | width | variance in the first 16 / 32 / 64 / 128 principal components |")
    print("|---|---|---|")
    for name in names:
        x = acts[name][train].double()
        x = x - x.mean(0)
        spectrum = torch.linalg.eigvalsh(x.T @ x).flip(0)
        shares = torch.cumsum(spectrum, 0) / spectrum.sum()
        cells = " / ".join(f"{shares[min(q, len(shares)) - 1]:.2f}" for q in (16, 32, 64, 128))
        print(f"| {name} | {x.shape[1]} | {cells} |")


if __name__ == "__main__":
    main()
