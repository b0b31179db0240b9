"""Cache extraction against the bare backbone forward on the same images. Prints a table.

    python benchmarks/extraction_throughput.py                     # 64 shared photos, offline pair
    python benchmarks/extraction_throughput.py --images DIR --count 256 --device cuda

Both sides run every backbone on the same images in the same batches; the bare side gets the
images already decoded and preprocessed, so the difference is what the pipeline adds: decoding,
preprocessing, fp16 conversion, writing the memmaps, progress files and the statistics. The
rows alternate (bare, pipeline, bare, pipeline) so that a noisy machine affects both alike.
Not run by the tests.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import usae_backbones  # noqa: E402
import usae_cache  # noqa: E402
import usae_images  # noqa: E402


def bare_forward(backbones, pixels: list[torch.Tensor], batch_size: int, device) -> float:
    """Seconds for every backbone's forward over pre-decoded, preprocessed batches."""
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(pixels[0]), batch_size):
            for backbone, images in zip(backbones, pixels):
                backbone(images[first:first + batch_size].to(device)).cpu()
    return time.perf_counter() - start


def images_and_backbones(args) -> tuple[usae_images.ImageSet, list]:
    """The first ``args.count`` images of ``args.images`` (default: the shared photos) and the
    backbones named in ``args.backbones``, in eval mode on ``args.device``."""
    images = (usae_images.list_images(args.images) if args.images
              else usae_images.default_images())
    images = images.subset(range(min(args.count, len(images))))
    return images, [usae_backbones.load_backbone(name, device=args.device).eval()
                    for name in args.backbones.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=None, help="image folder (default: shared photos)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbones", default=",".join(usae_backbones.OFFLINE_DEFAULT))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4, help="image-decoding threads")
    args = parser.parse_args()

    images, backbones = images_and_backbones(args)
    decoded = [usae_images.open_image(images.absolute(i)).image for i in range(len(images))]
    pixels = [torch.stack([b.preprocess(image) for image in decoded]) for b in backbones]

    bare_forward(backbones, [p[:args.batch_size] for p in pixels], args.batch_size,
                 args.device)  # warm-up: first calls allocate and pick kernels
    rows = []
    for repeat in range(args.repeats):
        bare = bare_forward(backbones, pixels, args.batch_size, args.device)
        folder = Path(tempfile.mkdtemp(prefix="usae-extraction-"))
        start = time.perf_counter()
        usae_cache.build_cache(backbones, images, folder, batch_size=args.batch_size,
                               device=args.device, progress=False, workers=args.workers)
        pipeline = time.perf_counter() - start
        shutil.rmtree(folder)
        rows.append((repeat, len(images) / bare, len(images) / pipeline, pipeline / bare - 1))

    print(f"backbones: {args.backbones}; {len(images)} images; batch {args.batch_size}; "
          f"device {args.device}; torch threads {torch.get_num_threads()}; "
          f"decoding threads {args.workers}")
    print("repeat | bare forward img/s | pipeline img/s | pipeline overhead")
    print("-------|--------------------|----------------|------------------")
    for repeat, bare, pipe, overhead in rows:
        print(f"{repeat:6d} | {bare:18.2f} | {pipe:14.2f} | {overhead:16.1%}")
    overheads = sorted(row[3] for row in rows)
    print(f"median overhead over {len(rows)} repeats: {overheads[len(rows) // 2]:.1%}")


if __name__ == "__main__":
    main()
