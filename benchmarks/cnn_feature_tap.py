"""Where to tap a CNN: its final BatchNorm output (pre-activation) or after the ReLU6. Prints a table.

    python benchmarks/cnn_feature_tap.py                  # imagenet-200x5 from ../shared/data
    python benchmarks/cnn_feature_tap.py --images DIR --count 400

For each offline CNN and each tap, on the same images: the share of exact zeros; the skew of the
scalar-standardised entries ((median - mean) / std: what an L1 criterion predicts first is the
median); leave-one-out 1-nearest-neighbour accuracy by cosine of the mean-pooled map and of single
tokens (8 random grid positions per image, the label of the nearest token of another image); the
mutual 10-nearest-neighbour agreement of the two CNNs' mean-pooled maps at the same tap; and the
held-out self-R^2 (paper form) of a one-model TopK SAE of this library trained on four images
in five (every fifth held out) under the released L1 criterion and under MSE. Not run by the tests.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import usae_analysis  # noqa: E402
import usae_backbones  # noqa: E402
import usae_core  # noqa: E402
import usae_images  # noqa: E402

CNNS = ("mobilenetv2_deepsort", "efficientnet_lite0")


def tokens_both_taps(backbone, images, batch_size: int) -> dict[str, torch.Tensor]:
    """(images, 196, 1280) tokens of both taps from one forward per batch."""
    out = {"pre_activation": [], "post_activation": []}
    activation = backbone.activation if backbone.tap == "post_activation" else None
    assert activation is not None, "load the *_relu6 name: it holds the ReLU6 module"
    with torch.inference_mode():
        for first in range(0, len(images), batch_size):
            pixels = torch.stack([backbone.preprocess(usae_images.open_image(
                images.absolute(i)).image) for i in range(first, min(first + batch_size,
                                                                     len(images)))])
            fmap = backbone._features(pixels)
            for tap, value in (("pre_activation", fmap),
                               ("post_activation", activation(fmap.clone()))):  # in place
                tokens = value.flatten(2).transpose(1, 2)
                out[tap].append(usae_backbones.resample_tokens(tokens, tuple(fmap.shape[-2:])))
    return {tap: torch.cat(parts) for tap, parts in out.items()}


def nearest_neighbour_accuracy(features: torch.Tensor, labels: np.ndarray,
                               groups: np.ndarray) -> float:
    """Leave-one-group-out 1-NN by cosine: a row's neighbour must come from another group."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    similarity = x @ x.T
    same = torch.from_numpy(groups[:, None] == groups[None, :])
    similarity[same] = -2.0
    return float((labels[similarity.argmax(1).numpy()] == labels).mean())


def mutual_knn(a: torch.Tensor, b: torch.Tensor, groups: np.ndarray, k: int = 10) -> float:
    """Mean share of the k nearest neighbours (cosine, other groups only) two feature sets share
    (Huh et al., 2024)."""
    found = []
    for x in (a, b):
        x = torch.nn.functional.normalize(x.double(), dim=1)
        similarity = x @ x.T
        similarity[torch.from_numpy(groups[:, None] == groups[None, :])] = -2.0
        found.append(similarity.topk(k, dim=1).indices)
    return float(np.mean([len(set(p.tolist()) & set(q.tolist())) for p, q in zip(*found)]) / k)


def sae_r2(tokens: torch.Tensor, held_out: np.ndarray, loss: str, seed: int) -> float:
    """Held-out paper-form self-R^2 of a one-model TopK SAE (n = 512, k = 32, 4 epochs, unit-norm
    initial rows, channels centred: the offline recipe's choices, see README)."""
    flat_train = tokens[~held_out].reshape(-1, tokens.shape[-1])
    flat_test = tokens[held_out].reshape(-1, tokens.shape[-1])
    model = usae_core.USAE({"m": tokens.shape[-1]}, 512, 32, seed=seed)
    model.fit_standardization({"m": flat_train}, centre_channels=True)
    order = torch.randperm(len(flat_train), generator=torch.Generator().manual_seed(seed))
    batches = [{"m": flat_train[order[i:i + 1024]]} for i in range(0, len(order) - 1023, 1024)]
    usae_core.train(model, batches, steps=4 * len(batches), seed=seed, loss=loss, lr=1e-3,
                    dictionary_init="unit", progress=False, log_every=10_000)
    encoded = usae_analysis.encode_dataset(model, [{"m": flat_test}])
    return encoded.reconstruction.r2_paper[0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=None,
                        help="image folder (default: ../shared/data/imagenet-200x5)")
    parser.add_argument("--count", type=int, default=0, help="images to use (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = args.images or usae_images.shared_data_root() / "imagenet-200x5"
    images = usae_images.list_images(root)
    if args.count:
        images = type(images)(images.root, images.paths[:args.count], images.labels[:args.count])
    labels = np.asarray(images.labels)
    held_out = np.arange(len(images)) % 5 == 4
    rng = np.random.default_rng(args.seed)
    picked = np.stack([rng.choice(196, 8, replace=False) for _ in range(len(images))])

    rows, pooled = [], {}
    for name in CNNS:
        backbone = usae_backbones.load_backbone(f"{name}_relu6")
        for tap, tokens in tokens_both_taps(backbone, images, args.batch_size).items():
            values = tokens.double()
            scaled = (values - values.mean()) / values.std()
            skew = float((scaled.flatten()[::97].median() - scaled.mean()) / scaled.std())
            token_features = tokens[np.arange(len(images))[:, None], picked].reshape(-1, 1280)
            pooled[name, tap] = tokens.mean(1)
            rows.append((name, tap, float((tokens == 0).double().mean()), skew,
                         nearest_neighbour_accuracy(tokens.mean(1), labels,
                                                    np.arange(len(images))),
                         nearest_neighbour_accuracy(token_features, labels.repeat(8),
                                                    np.arange(len(images)).repeat(8)),
                         sae_r2(tokens, held_out, "l1_aux", args.seed),
                         sae_r2(tokens, held_out, "mse", args.seed)))
            print(*rows[-1], flush=True, file=sys.stderr)

    print(f"{len(images)} images of {root}; SAE R^2 on the {held_out.sum()} held-out images.")
    header = ("backbone", "tap", "zeros", "skew", "1-NN", "token 1-NN", "SAE R2 (L1)",
              "SAE R2 (MSE)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, tap, zeros, skew, nn_pooled, nn_token, r2_l1, r2_mse in rows:
        print(f"| {name} | {tap} | {zeros:.1%} | {skew:+.2f} | {nn_pooled:.3f} | "
              f"{nn_token:.3f} | {r2_l1:.3f} | {r2_mse:.3f} |")
    for tap in ("pre_activation", "post_activation"):
        agreement = mutual_knn(pooled[CNNS[0], tap], pooled[CNNS[1], tap],
                               np.arange(len(images)))
        print(f"mutual 10-NN agreement of the two CNNs, {tap}: {agreement:.3f}")


if __name__ == "__main__":
    main()
