"""TokenLoader throughput on a synthetic cache at the paper's widths. Prints a table.

    python benchmarks/loader_throughput.py                 # 200k tokens (~1,020 images), temp dir
    python benchmarks/loader_throughput.py --rows 2000000 --cache /data/bench-cache
    python benchmarks/loader_throughput.py --cache path/to/real/cache   # an existing cache

Tokens/s counts rows delivered (one row = one token for every model); MB/s counts the fp16
bytes of those rows (2 x sum of widths per token). A freshly written cache sits in the page
cache, so the numbers measure memory speed, not the disk, unless the cache is larger than RAM.
The training loop needs about 24 MB per step at the paper's batch of 6,272 (field notes 4.2).
Not run by the tests.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import usae_cache  # noqa: E402
import usae_cache_files  # noqa: E402
import usae_loader  # noqa: E402

PAPER_WIDTHS = {"dinov2": 384, "siglip": 768, "vit": 768}


def measure(cache: usae_cache.Cache, batches: int, **options) -> tuple[float, float, float]:
    """Seconds to the first batch, tokens/s and MB/s over ``batches`` batches after it."""
    loader = usae_loader.TokenLoader(cache, usae_loader.LoaderConfig(**options))
    start = time.perf_counter()
    stream = iter(loader)
    next(stream)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    tokens = batches * loader.config.batch_size / seconds
    mb = tokens * 2 * sum(cache.widths.values()) / 1e6
    return first, tokens, mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="tokens in the synthetic cache")
    parser.add_argument("--cache", type=Path, help="folder: an existing cache, or where to write "
                        "the synthetic one (default: a temporary folder)")
    parser.add_argument("--batch-size", type=int, default=6272)
    parser.add_argument("--batches", type=int, default=64, help="timed batches per row")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--trainer-steps", type=int, default=2,
                        help="trainer steps timed at n=6144, k=32 on the same batches (0: skip)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="usae-bench-") as tmp:
        folder = args.cache or Path(tmp) / "cache"
        if (folder / usae_cache_files.METADATA_FILE).exists():
            cache = usae_cache.open_cache(folder)
            origin = "existing"
        else:
            start = time.perf_counter()
            cache = usae_cache.make_synthetic_cache(folder, PAPER_WIDTHS, -(-args.rows // 196))
            origin = f"synthetic, written in {time.perf_counter() - start:.1f} s"
        size = cache.n_tokens * 2 * sum(cache.widths.values())
        # Touch every page once, so that no row pays for first-touch page faults of the map.
        start = time.perf_counter()
        for array in cache.arrays.values():
            for row in range(0, len(array), 65536):
                np.array(array[row:row + 65536])
        warm = time.perf_counter() - start
        epochs = args.batches * args.batch_size / cache.n_tokens
        print(f"cache: {folder} ({origin}); {cache.n_tokens:,} tokens x widths "
              f"{cache.widths} fp16 = {size / 1e9:.2f} GB; batch {args.batch_size}; "
              f"{args.batches} timed batches ({epochs:.1f} epochs); warm-up read "
              f"{size / 1e6 / warm:,.0f} MB/s; torch threads "
              f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}")
        rows = [
            ("default (chunk 4096 x 32, prefetch)", {}),
            ("no prefetch", {"prefetch": False}),
            ("standardize=True", {"standardize": True}),
            ("small buffer (chunk 1024 x 8)", {"chunk_rows": 1024, "buffer_chunks": 8}),
            ("large buffer (chunk 4096 x 128)", {"buffer_chunks": 128}),
        ]
        print(f"\n| {'loader':<36} | {'first batch s':>13} | {'batches/s':>9} | "
              f"{'tokens/s':>12} | {'MB/s':>8} |")
        print(f"|{'-' * 38}|{'-' * 15}|{'-' * 11}|{'-' * 14}|{'-' * 10}|")
        measured = {}
        for label, options in rows:
            first, tokens, mb = measure(cache, args.batches, batch_size=args.batch_size,
                                        **options)
            print(f"| {label:<36} | {first:>13.3f} | {tokens / args.batch_size:>9.1f} | "
                  f"{tokens:>12,.0f} | {mb:>8,.0f} |")
            measured[label] = tokens
        if args.trainer_steps:
            consumed = trainer_tokens_per_second(cache, args.batch_size, args.trainer_steps)
            print(f"\ntrainer consumption (n=6144, k=32, default options, this device): "
                  f"{consumed:,.0f} tokens/s")
            print(f"loader (default) / trainer = {measured[rows[0][0]] / consumed:,.1f}x")
        del cache


def trainer_tokens_per_second(cache: usae_cache.Cache, batch_size: int, steps: int) -> float:
    """Tokens/s that usae_core.Trainer consumes at the paper's sizes on these batches."""
    import usae_core

    model = usae_core.USAE(cache.widths, n_concepts=6144, k=32, seed=0)
    model.set_standardization(cache.standardization)
    loader = iter(usae_loader.TokenLoader(cache, usae_loader.LoaderConfig(batch_size=batch_size)))
    batches = [{n: model.standardize(n, t) for n, t in next(loader).items()}
               for _ in range(steps + 1)]
    trainer = usae_core.Trainer(model, usae_core.TrainConfig(), total_steps=steps + 1, seed=0)
    model.train()
    trainer.step(batches[0])  # warm-up: first calls allocate
    start = time.perf_counter()
    for batch in batches[1:]:
        trainer.step(batch)
    return steps * batch_size / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
