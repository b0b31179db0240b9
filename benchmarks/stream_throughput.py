"""Throughput of usae_stream.TokenStream: images/s and tokens/s delivered to training. Prints a table.

    python benchmarks/stream_throughput.py --backbones mobilenetv2_deepsort --count 64
    python benchmarks/stream_throughput.py --count 256 --workers 8 --device cuda

Each repeat iterates a fresh stream over the same images until one epoch of batches has been
delivered (the first chunk's extraction included), after one warm-up pass; the backbones' forward
dominates. Not run by the tests.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from extraction_throughput import images_and_backbones  # noqa: E402
from usae_stream import StreamConfig, TokenStream  # noqa: E402


def one_epoch(backbones, images, config: StreamConfig) -> tuple[float, int]:
    """Seconds for the batches of one epoch, and the rows delivered."""
    stream = TokenStream(backbones, images, config)
    start, rows = time.perf_counter(), 0
    for batch in stream:
        rows += len(next(iter(batch.values())))
        if stream.rows_per_epoch is not None and rows + config.batch_size > stream.rows_per_epoch:
            break
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=None, help="image folder (default: shared photos)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--backbones", default="mobilenetv2_deepsort")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per image (all: 196)")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per batch")
    parser.add_argument("--buffer-images", type=int, default=32)
    parser.add_argument("--forward-images", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    images, backbones = images_and_backbones(args)
    config = StreamConfig(batch_size=args.batch_size, tokens_per_image=args.tokens,
                          buffer_images=args.buffer_images, workers=args.workers,
                          device=args.device, forward_images=args.forward_images)
    one_epoch(backbones, images, config)  # warm-up: first calls allocate and pick kernels
    print(f"backbones: {args.backbones}; {len(images)} images; tokens/image "
          f"{args.tokens or 'all'}; buffer {args.buffer_images} images; forward "
          f"{args.forward_images} images; device {args.device}; torch threads "
          f"{torch.get_num_threads()}; decoding processes {args.workers}")
    print("repeat | seconds | images/s | tokens/s")
    print("-------|---------|----------|---------")
    speeds = []
    for repeat in range(args.repeats):
        seconds, rows = one_epoch(backbones, images, config)
        speeds.append(len(images) / seconds)
        print(f"{repeat:6d} | {seconds:7.2f} | {len(images) / seconds:8.2f} | "
              f"{rows / seconds:8.0f}")
    print(f"median images/s over {len(speeds)} repeats: {sorted(speeds)[len(speeds) // 2]:.2f}")


if __name__ == "__main__":
    main()
