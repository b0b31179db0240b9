"""Memory and storage of the analysis at the paper's sizes, measured, then scaled to ImageNet-val.

Encodes synthetic activations of ``--images`` images (196 tokens each, widths 384/768/768) with a
USAE of n=6144, k=32, stores the codes sparsely, runs the concept statistics and the top-image
search, and measures: bytes of stored codes per image (all models), the peak resident memory
added by one analysis batch, and the time per image. The last table scales the measured
per-image costs to the 50,000 images of the ImageNet validation set.

    python benchmarks/analysis_scale.py --images 200
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import usae_analysis as analysis  # noqa: E402
import usae_core as core  # noqa: E402


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-images", type=int, default=50)
    parser.add_argument("--target-images", type=int, default=50_000)
    args = parser.parse_args()
    torch.manual_seed(0)
    dims, n, k, tokens = {"dinov2": 384, "siglip": 768, "vit": 768}, 6144, 32, 196
    model = core.USAE(dims, n, k, seed=0).eval()
    model.set_standardization({name: (0.0, 1.0) for name in dims})
    batch_tokens = args.batch_images * tokens
    batches = ({name: torch.randn(batch_tokens, width) for name, width in dims.items()}
               for _ in range(args.images // args.batch_images))

    baseline = rss_bytes()
    start = time.perf_counter()
    encoded = analysis.encode_dataset(model, batches)
    encode_seconds = time.perf_counter() - start
    peak_added = rss_bytes("VmHWM") - baseline
    n_images = len(encoded.codes["vit"]) // tokens
    code_bytes = sum(codes.nbytes for codes in encoded.codes.values())
    start = time.perf_counter()
    stats = analysis.concept_statistics(encoded.codes)
    analysis.universality(stats)
    top = analysis.top_images(encoded.codes["vit"], tokens, range(100), 10)
    stats_seconds = time.perf_counter() - start
    assert top.shape == (100, 10)

    per_image = code_bytes / n_images
    dense_per_image = len(dims) * tokens * n * 4
    counters = analysis.analysis_memory_bytes(1, tokens, len(dims), k, n)["counters"]
    target = args.target_images
    projected = per_image * target + counters + peak_added
    rows = [
        ("images measured", f"{n_images}"),
        ("stored codes per image, all models", f"{per_image:,.0f} B"),
        ("dense fp32 codes per image, all models", f"{dense_per_image:,.0f} B"),
        ("sparse / dense", f"{per_image / dense_per_image:.4%}"),
        ("peak memory added while encoding (batches of "
         f"{args.batch_images} images)", f"{peak_added / 2**20:,.0f} MiB"),
        ("encode time per image (this CPU)", f"{encode_seconds / n_images * 1e3:.0f} ms"),
        ("statistics + top images per image", f"{stats_seconds / n_images * 1e3:.1f} ms"),
        (f"projected codes for {target:,} images", f"{per_image * target / 2**30:.2f} GiB"),
        ("projected total (codes + counters + batch peak)", f"{projected / 2**30:.2f} GiB"),
        ("fits in 16 GB", "yes" if projected < 16e9 else "NO"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'quantity':{width}s} | value")
    print(f"{'-' * width}-|-------")
    for name, value in rows:
        print(f"{name:{width}s} | {value}")


if __name__ == "__main__":
    main()
