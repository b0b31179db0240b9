"""The independent SAEs trained one after another, or side by side (notebook 00).

On the default run's training cache (``results/offline`` or ``--out``), trains one SAE per
model for ``--steps`` steps each (and the USAE, which ``usae_pipeline.train_models`` trains
alone first, for one step) into temporary folders: one after another in this process on every
torch thread (``workers=1``), then side by side in one process per torch thread, then in one
process per model (each on ``threads // workers`` threads, at least 1). Prints the wall time of
each and its ratio to the first; the weights differ by floating-point rounding only
(tests/test_pipeline.py). Start-up (spawning, imports, statistics) is included, so short runs
understate the gain.

    python benchmarks/parallel_training.py --out results/offline --steps 600
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import usae_cache  # noqa: E402
import usae_pipeline as pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/offline", help="a finished run's folder")
    parser.add_argument("--steps", type=int, default=600, help="steps per model")
    args = parser.parse_args()
    fields = json.loads((Path(args.out) / "experiment.json").read_text())
    cache = usae_cache.open_cache(Path(args.out) / "caches" / "train")
    epochs = args.steps * fields["batch_tokens"] / cache.n_tokens
    threads = torch.get_num_threads()
    print(f"{cache.path}: {len(cache.names)} SAEs, {args.steps} steps each, "
          f"{threads} torch threads", flush=True)
    rows = []
    models = len(cache.names)
    plans = {"one after another": 1, "one process per thread": min(threads, models),
             "one process per model": models}
    for label, workers in plans.items():
        with tempfile.TemporaryDirectory() as folder:
            exp = pipeline.Experiment(**{**fields, "out": folder, "figures": folder,
                                         "epochs": fields["batch_tokens"] / cache.n_tokens,
                                         "independent_epochs": epochs})
            start = time.perf_counter()
            pipeline.train_models(exp, cache, workers=workers, progress=False)
            rows.append((label, time.perf_counter() - start))
        print(f"{label}: {rows[-1][1]:.1f} s", flush=True)
    print("\n| how | processes × threads | wall time (s) | relative |\n|---|---|---|---|")
    for (label, seconds), workers in zip(rows, plans.values()):
        shape = f"{workers} × {threads if workers == 1 else max(1, threads // workers)}"
        print(f"| {label} | {shape} | {seconds:.1f} | {seconds / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
