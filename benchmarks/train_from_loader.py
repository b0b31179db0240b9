"""Training fed by the cache loader, on one device, as a run trains. Prints a table.

    python benchmarks/train_from_loader.py --device cuda             # the paper's sizes
    torchrun --standalone --nproc_per_node 1 benchmarks/train_from_loader.py --device cuda
                                                   # the same through usae_distributed.train
    python benchmarks/train_from_loader.py --smoke                   # tiny, on the CPU

A synthetic cache at the paper's widths (384/768/768, fp16, in a temporary folder) feeds
``usae_loader.TokenLoader`` with ``device`` set, so batches arrive on the device; the rows time
``usae_core.train`` over those batches in fp32 and bf16, against the loader alone and against
the same steps on batches already resident on the device. Under ``torchrun`` every rank trains
through ``usae_distributed.train`` on its slice of the same global batches (one rank: the DDP
path's overhead over the plain loop). Each row: tokens/s of the global batch over ``--steps``
steps after ``--warmup`` steps. Not run by the tests.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import usae_cache  # noqa: E402
import usae_core as core  # noqa: E402
import usae_distributed  # noqa: E402
import usae_loader  # noqa: E402

PAPER = {"widths": {"dinov2": 384, "siglip": 768, "vit": 768}, "n": 6144, "k": 32,
         "batch": 6272}
SMOKE = {"widths": {"dinov2": 24, "siglip": 48, "vit": 48}, "n": 128, "k": 8, "batch": 392}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(run, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test the script")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else PAPER
    distributed = "WORLD_SIZE" in os.environ  # launched by torchrun
    ctx = usae_distributed.init()
    device = ctx.device if distributed else args.device
    batch, total = sizes["batch"], args.warmup + args.steps
    images = -(-(total + 1) * batch // 196)  # rows for every step without a second epoch

    with tempfile.TemporaryDirectory(prefix="usae-bench-") as tmp:
        cache = usae_cache.make_synthetic_cache(Path(tmp) / "cache", sizes["widths"], images)

        def loader() -> usae_loader.TokenLoader:
            return usae_loader.TokenLoader(cache, usae_loader.LoaderConfig(batch_size=batch,
                                                                           device=device))

        def train(batches, precision: str, steps: int, on_step=None) -> None:
            model = core.USAE(cache.widths, sizes["n"], sizes["k"], seed=0)
            model.set_standardization(cache.standardization)
            loop = usae_distributed.train if distributed else core.train
            loop(model, batches, steps, seed=0, device=device, precision=precision,
                 progress=False, on_step=on_step)

        def per_timed_steps(batches, precision: str) -> float:
            """Seconds from the end of the warm-up steps to the end of the last step: model
            creation and first-step costs stay out, fetching batches stays in."""
            marks = {}

            def mark(trainer: core.Trainer, output: core.StepOutput) -> None:
                if trainer.step_count in (args.warmup, total):
                    synchronize(device)
                    marks[trainer.step_count] = time.perf_counter()

            train(batches, precision, total, mark)
            return marks[total] - marks[args.warmup]

        seconds = {}
        stream = iter(loader())
        for _ in range(args.warmup):
            next(stream)
        seconds["loader alone"] = timed(lambda: [next(stream) for _ in range(args.steps)],
                                        device)
        resident = list(itertools.islice(iter(loader()), total))
        for precision in ("fp32", "bf16"):
            seconds[f"train {precision}, batches resident"] = per_timed_steps(resident, precision)
            seconds[f"train {precision}, fed by the loader"] = per_timed_steps(loader(), precision)
        if ctx.rank == 0:
            how = f"{ctx.world_size} rank(s) of torchrun, usae_distributed.train" \
                if distributed else "one process, usae_core.train"
            name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else \
                f"CPU, {torch.get_num_threads()} torch threads"
            print(f"device: {name}; torch {torch.__version__}; {how}")
            print(f"sizes: widths {cache.widths}, n={sizes['n']}, k={sizes['k']}, global batch "
                  f"{batch} tokens; {args.steps} timed steps after {args.warmup}")
            print(f"| {'row':<36} | {'tokens/s':>12} |")
            print(f"|{'-' * 38}|{'-' * 14}|")
            for label, spent in seconds.items():
                print(f"| {label:<36} | {args.steps * batch / spent:>12,.0f} |")
    usae_distributed.close()


if __name__ == "__main__":
    main()
