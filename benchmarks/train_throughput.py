"""Training throughput: the released training loop against usae_core's Trainer. Prints a table.

    python benchmarks/train_throughput.py                  # the paper's sizes (slow on a CPU)
    python benchmarks/train_throughput.py --n 1024 --tokens 1024 --widths 96,192,192
    python benchmarks/train_throughput.py --levers         # also the rows that split the gain
    python benchmarks/train_throughput.py --entry --n 2048 --k 32 --tokens 1568 --steps 10
                                                # also train() as the README calls it

(a) ``reference``: the released loop written out plainly (``reference_step`` in
tests/test_train_speed.py, which proves it equal to the trainer in fp32). (b) ``trainer``:
``usae_core.Trainer.step`` with the default options (fp32, dense decode); the other ``trainer``
rows add the ``sparse_decode`` and ``precision="bf16"`` options. ``--levers`` adds ``per-target``
(the released criterion, ``released_l1_aux``, called once per target with the frozen decoders detached,
unsorted TopK and no host sync: the trainer as it was before this benchmark existed) and
``trainer, loop AdamW`` (the trainer with the released non-fused optimizers swapped in).
``--entry`` adds the user's setting: ``(a') released loop, raw`` standardises raw batches as the
released data loader does, then runs (a); ``(c) usae_checkpoint.train`` calls the entry point as
the README shows (raw batches, default options, progress bar, checked batches, history), once per
round for ``--steps`` steps. Its ratio c/a' is printed last.

All rows run in one process on the same synthetic token-aligned batches (a shared low-rank
signal seen through a random projection per model, plus noise, standardised) and the same
seeded sequence of source models, alternating row by row in every round, so machine noise hits
them alike; each row reports the median over rounds. Tokens/s counts the tokens of a step
(one token = one row of every model). GFLOP/s counts the matmul FLOPs that row executes
(``torch.utils.flop_counter``; a gather such as ``embedding_bag`` counts zero). On a GPU the
table also gives that as a fraction of a bf16 matmul peak measured in the same run. The last
line printed is the ratio b / a. Not run by the tests.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import usae_checkpoint as ckpt  # noqa: E402
import usae_core as core  # noqa: E402
from test_train_speed import (released_l1_aux, reference_optimizers,  # noqa: E402
                              reference_step)

PAPER = dict(n=6144, tokens=6272, widths="384,768,768", k=32)
NAMES = ("dinov2", "siglip", "vit")


def synthetic_batches(widths: list[int], tokens: int, count: int, device: torch.device,
                      seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    names = NAMES if len(widths) == 3 else [f"model{i}" for i in range(len(widths))]
    batches = []
    for _ in range(count):
        shared = torch.randn(tokens, 64, generator=generator)
        batch = {}
        for name, width in zip(names, widths):
            acts = shared @ torch.randn(64, width, generator=generator) / 8
            acts += 0.5 * torch.randn(tokens, width, generator=generator)
            batch[name] = ((acts - acts.mean()) / acts.std()).to(device)
        batches.append(batch)
    return batches


def per_target_step(trainer: core.Trainer, batch: dict, source: str) -> torch.Tensor:
    """The straightforward step: the released criterion once per target, frozen decoders
    detached."""
    model, optimizer = trainer.model, trainer.optimizers[source]
    optimizer.zero_grad(set_to_none=True)
    encoding = model.encode_full(source, batch[source], standardized=True)
    terms = []
    for name in model.names:
        dictionary = model.dictionary(name)
        dictionary = dictionary if name == source else dictionary.detach()
        terms.append(released_l1_aux(batch[name], encoding.pre_codes, encoding.codes,
                                     dictionary))
    losses = torch.stack(terms)
    losses.sum().backward()
    torch.nn.utils.clip_grad_norm_(model.pairs[source].parameters(), 1.0)
    optimizer.step()
    return losses.detach()


def make_rows(args, dims: dict[str, int], device: torch.device) -> dict[str, Callable]:
    """Row label -> step(batch, source)."""
    def fresh() -> core.USAE:
        return core.USAE(dims, args.n, args.k, seed=0).to(device).train()

    rows: dict[str, Callable] = {}
    model = fresh()
    optimizers = reference_optimizers(model)
    rows["(a) reference (released loop)"] = \
        lambda batch, source, m=model, o=optimizers: reference_step(m, o, batch, source, 3e-4)
    if args.levers:
        trainer = core.Trainer(fresh(), core.TrainConfig(), 10**6, seed=0)
        trainer.optimizers = reference_optimizers(trainer.model)
        rows["per-target (before)"] = lambda batch, source, t=trainer: \
            per_target_step(t, batch, source)
        trainer = core.Trainer(fresh(), core.TrainConfig(), 10**6, seed=0)
        trainer.optimizers = reference_optimizers(trainer.model)
        rows["trainer, loop AdamW"] = trainer.step
    configs = {"(b) trainer fp32": {}}
    if not args.quick:
        configs.update({"trainer fp32 sparse_decode": dict(sparse_decode=True),
                        "trainer bf16": dict(precision="bf16"),
                        "trainer bf16 sparse_decode": dict(precision="bf16", sparse_decode=True)})
    for label, options in configs.items():
        rows[label] = core.Trainer(fresh(), core.TrainConfig(**options), 10**6, seed=0).step
    return rows


def entry_rows(args, raw: list[dict], device: torch.device) -> dict[str, Callable]:
    """Row label -> run(steps) on raw batches: the released loop with its data loader's
    standardisation, and usae_checkpoint.train as the README calls it."""
    dims = {name: t.shape[1] for name, t in raw[0].items()}
    names = list(dims)
    stats = {name: (t.mean().item(), t.std().item()) for name, t in raw[0].items()}
    released = core.USAE(dims, args.n, args.k, seed=0).to(device).train()
    optimizers = reference_optimizers(released)
    generator = torch.Generator().manual_seed(1)
    done = [0]

    def released_loop(steps: int) -> None:
        for _ in range(steps):
            batch = raw[done[0] % len(raw)]
            batch = {n: (t - stats[n][0]) / (stats[n][1] + core.STD_EPS) for n, t in batch.items()}
            source = names[torch.randint(len(names), (1,), generator=generator).item()]
            reference_step(released, optimizers, batch, source, 3e-4)
            done[0] += 1

    def entry_point(**options) -> Callable[[int], None]:
        model, calls = core.USAE(dims, args.n, args.k, seed=0), [0]

        def run(steps: int) -> None:
            calls[0] += 1
            ckpt.train(model, raw, steps=steps, seed=calls[0], device=str(device), **options)
        return run

    return {"(a') released loop, raw": released_loop, "(c) usae_checkpoint.train": entry_point(),
            "usae_checkpoint.train, dense decode": entry_point(sparse_decode=False),
            "usae_checkpoint.train, sparse decode": entry_point(sparse_decode=True)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_matmul_peak(device: torch.device, size: int = 8192, reps: int = 20) -> float:
    """TFLOP/s of a large bf16 matmul on a GPU: the peak the rows are compared with."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e12


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=PAPER["n"], help="concepts (paper: 6144)")
    parser.add_argument("--tokens", type=int, default=PAPER["tokens"],
                        help="tokens per step (paper: 32 images x 196 = 6272)")
    parser.add_argument("--widths", default=PAPER["widths"],
                        help="comma-separated model widths (paper: 384,768,768)")
    parser.add_argument("--k", type=int, default=PAPER["k"], help="TopK (released: 32)")
    parser.add_argument("--steps", type=int, default=3, help="steps per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument("--levers", action="store_true", help="add the rows that split the gain")
    parser.add_argument("--quick", action="store_true", help="only rows (a) and (b)")
    parser.add_argument("--entry", action="store_true",
                        help="add the released loop on raw batches and usae_checkpoint.train")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    widths = [int(w) for w in args.widths.split(",")]
    batches = synthetic_batches(widths, args.tokens, 2, device)
    dims = {name: t.shape[1] for name, t in batches[0].items()}
    names = list(dims)
    generator = torch.Generator().manual_seed(0)
    sources = [names[i] for i in torch.randint(len(names), (64,), generator=generator)]
    rows = make_rows(args, dims, device)
    runs = {}  # label -> run(steps), for rows that are whole loops
    if args.entry:  # raw activations: an offset and a scale of the standardised ones
        raw = [{n: 3 * t + 1 for n, t in batch.items()} for batch in batches]
        runs = entry_rows(args, raw, device)

    done = dict.fromkeys(rows, 0)  # every row sees the same batches and sources in turn

    def run(label: str, steps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        if label in runs:
            runs[label](steps)
        else:
            for i in range(done[label], done[label] + steps):
                rows[label](batches[i % len(batches)], sources[i % len(sources)])
        synchronize(device)
        done[label] += steps
        return time.perf_counter() - start

    rows.update(dict.fromkeys(runs))
    done.update(dict.fromkeys(runs, 0))
    flops = {}
    for label in rows:
        run(label, 1)  # warm-up: optimizer state, allocator, kernels
        with FlopCounterMode(display=False) as flop_counter:
            run(label, 1)
        flops[label] = flop_counter.get_total_flops()
    seconds: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(args.rounds):
        for label in rows:
            seconds[label].append(run(label, args.steps) / args.steps)
    peak = bf16_matmul_peak(device) if device.type == "cuda" else None

    print(f"device: {machine(device)}; torch {torch.__version__}")
    print(f"sizes: widths {dims}, n={args.n}, k={args.k}, tokens/step={args.tokens}; "
          f"{args.rounds} rounds x {args.steps} steps per row, alternating, median")
    if peak:
        print(f"bf16 matmul peak measured here: {peak:.1f} TFLOP/s")
    reference = statistics.median(seconds["(a) reference (released loop)"])
    header = f"{'row':32s} {'s/step':>8s} {'tokens/s':>10s} {'vs (a)':>7s} {'GFLOP/s':>8s}"
    print(header + (f" {'% bf16 peak':>11s}" if peak else ""))
    for label, times in seconds.items():
        median = statistics.median(times)
        rate = flops[label] / median / 1e9
        line = (f"{label:32s} {median:8.3f} {args.tokens / median:10.0f} "
                f"{reference / median:6.2f}x {rate:8.1f}")
        print(line + (f" {100 * rate / 1e3 / peak:10.1f}%" if peak else ""))
    ratio = reference / statistics.median(seconds["(b) trainer fp32"])
    print(f"ratio b/a (trainer fp32 / released loop, tokens/s): {ratio:.2f}")
    if runs:
        ratio = statistics.median(seconds["(a') released loop, raw"]) / statistics.median(
            seconds["(c) usae_checkpoint.train"])
        print(f"ratio c/a' (usae_checkpoint.train / released loop, raw batches): {ratio:.2f}")


if __name__ == "__main__":
    main()
