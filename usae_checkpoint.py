"""Checkpoints of a USAE, and training that checks its input and resumes.

A checkpoint is **one safetensors file**: the JSON configuration (names, widths, n, k,
standardisation and, for training runs, the options, step, seed, history and optimizer
hyper-parameters) in its header, the weights and, for training runs, the optimizer and generator
state in its tensors, and a sha256 of both. No file of ours uses pickle; writes are
atomic (``usae_io``). :func:`train`, the entry point of training, is ``usae_core.train`` with
its arguments and batches checked, a ``usae_monitor`` history and checkpoints: killed at any
moment and run again, it ends with the same tensors as an uninterrupted run.

:func:`save` to a folder shares a model as model hubs expect (``model.safetensors``,
``config.json``, a ``README.md`` card). The authors' released ``.pth`` files are read by
``usae_official.import_official``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

import usae_checks as checks
import usae_core as core
import usae_io
import usae_monitor

FORMAT = "usae-checkpoint/1"
# A shared folder: the names model hubs look for (huggingface_hub's own mixins use the same).
WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, METRICS_NAME = (
    "model.safetensors", "config.json", "README.md", "metrics.json")
# How an optimizer computes its update (not what it computes): taken from the running process.
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match what it is used with."""


def _checksum(header: Mapping, tensors: Mapping[str, Tensor]) -> str:
    """sha256 of the header (less this checksum) and of every tensor's bytes, in key order."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"},
                                       sort_keys=True).encode())
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _trainer_state(trainer: core.Trainer) -> tuple[dict, dict[str, Tensor]]:
    tensors = {"trainer.generator_state": trainer.generator.get_state()}
    for name, start in trainer.initial_dictionaries.items():
        tensors[f"trainer.initial_dictionary.{name}"] = start
    for name, optimizer in trainer.optimizers.items():
        for index, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{name}.{index}.{key}"] = value
    groups = {name: [{k: v for k, v in group.items() if k != "params"}
                     for group in optimizer.state_dict()["param_groups"]]
              for name, optimizer in trainer.optimizers.items()}
    meta = {"config": dataclasses.asdict(trainer.config), "seed": trainer.seed,
            "total_steps": trainer.total_steps, "step": trainer.step_count,
            "updates": dict(trainer.updates), "param_groups": groups, "history": trainer.history}
    return meta, tensors


def _header(model: core.USAE) -> dict:
    """The configuration of ``model`` as stored in a checkpoint's header (and a folder's
    ``config.json``)."""
    return {"format": FORMAT, "library_version": core.__version__,
            "torch_version": torch.__version__, "model": model.config(),
            "standardization": {n: {"mean": m, "std": s}
                                for n, (m, s) in model.standardization().items()},
            "standardization_fitted": bool(model.standardization_fitted)}


def _write(model: core.USAE, path: Path, trainer: core.Trainer | None = None) -> None:
    header = _header(model)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if trainer is not None:
        header["training"], trainer_tensors = _trainer_state(trainer)
        tensors.update(trainer_tensors)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header["sha256"] = _checksum(header, tensors)
    usae_io.atomic_write(path, lambda tmp: save_file(tensors, tmp,
                                                     metadata={"usae": json.dumps(header)}))


def save(model: core.USAE, path: str | os.PathLike, *,
         metrics: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` to one safetensors file, or to a folder to share it.

    Parameters
    ----------
    model : usae_core.USAE
    path : path
        A ``.safetensors`` file; any other path (or an existing directory) is a folder that
        gets ``model.safetensors``, ``config.json`` and a ``README.md`` model card, ready for
        ``huggingface-cli upload``. :func:`load` reads either.
    metrics : mapping, optional
        Folders only: the run's numbers (e.g. ``metrics.json`` of ``usae_analysis``), written as
        ``metrics.json`` and summarised in the card. Without it the card summarises a
        ``metrics.json`` already in the folder.
    """
    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        _write_folder(model, path, metrics)
    elif metrics is not None:
        raise ValueError(f"metrics go into a folder's model card, and {path} is a single file: "
                         "pass a folder path (without the .safetensors suffix), or no metrics.")
    else:
        _write(model, path)


def _weights_file(path: Path) -> Path:
    """The safetensors file of a checkpoint given as that file or as a shared folder."""
    return path / WEIGHTS_NAME if path.is_dir() else path


def read_header(path: str | os.PathLike) -> dict:
    """The JSON configuration stored in a checkpoint (model, standardisation, training)."""
    path = _weights_file(Path(path))
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass a .safetensors file or a folder "
                              f"written by usae_checkpoint.save (it holds {WEIGHTS_NAME}).")
    try:
        with safe_open(path, framework="pt") as handle:
            header = json.loads((handle.metadata() or {})["usae"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        hint = " The authors' .pth files are read with usae_official.import_official." \
            if path.suffix in (".pth", ".pt") else ""
        raise CheckpointError(f"{path} is not a readable USAE checkpoint ({error}); it may be "
                              "truncated or from another program: train again or restore "
                              f"it from a copy.{hint}") from error
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {header.get('format')!r}, this library reads "
                              f"{FORMAT!r}.")
    return header


def _read(path: Path) -> tuple[dict, dict[str, Tensor]]:
    header = read_header(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"the tensors of {path} cannot be read ({error}); the file is "
                              "damaged: train again or restore it from a copy.") from error
    if "sha256" in header and _checksum(header, tensors) != header["sha256"]:
        raise CheckpointError(f"{path} fails its checksum: its bytes were altered after it was "
                              "written. Train again or restore it from a copy.")
    return header, tensors


def _load_model_state(model: core.USAE, header: dict, tensors: Mapping[str, Tensor],
                      path: Path) -> None:
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for name, width in model.dims.items():  # written before channel centring existed
        state.setdefault(f"pairs.{name}.channel_offset", torch.zeros(width))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"the weights in {path} do not fit its configuration: "
                              f"{error}") from error
    for name, (mean, std) in model.standardization().items():
        stored = header["standardization"][name]
        if not (math.isclose(mean, stored["mean"], rel_tol=1e-9, abs_tol=1e-12)
                and math.isclose(std, stored["std"], rel_tol=1e-9)):
            raise CheckpointError(f"{path}: the standardisation of {name!r} in the header "
                                  "disagrees with the stored tensors; the file was altered.")


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> core.USAE:
    """Read a model written by :func:`save` (a file or a folder) or by training; returns it in
    eval mode."""
    path = _weights_file(Path(path))
    header, tensors = _read(path)
    config = header["model"]
    checks.check_usae(config["dims"], config["n_concepts"], config["k"])
    model = core.USAE(config["dims"], config["n_concepts"], config["k"])
    _load_model_state(model, header, tensors, path)
    return model.to(device).eval()


def _load_trainer_state(trainer: core.Trainer, meta: dict, tensors: Mapping[str, Tensor]) -> None:
    trainer.generator.set_state(tensors["trainer.generator_state"])
    for name, optimizer in trainer.optimizers.items():
        prefix = f"optimizer.{name}."
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, field = key[len(prefix):].split(".", 1)
                state.setdefault(int(index), {})[field] = value
        groups = [dict(saved, betas=tuple(saved["betas"]), params=current["params"],
                       **{key: current[key] for key in _IMPLEMENTATION_KEYS if key in current})
                  for saved, current in zip(meta["param_groups"][name],
                                            optimizer.state_dict()["param_groups"])]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    trainer.updates, trainer.step_count = dict(meta["updates"]), meta["step"]
    trainer.history = list(meta.get("history", []))
    device = next(trainer.model.parameters()).device
    trainer.initial_dictionaries = {
        name: tensors[f"trainer.initial_dictionary.{name}"].to(device)
        for name in trainer.model.names if f"trainer.initial_dictionary.{name}" in tensors}


def _resume(trainer: core.Trainer, path: Path) -> None:
    header, tensors = _read(path)
    model, config = trainer.model, trainer.config
    if header["model"] != model.config():
        raise CheckpointError(f"the checkpoint {path} holds a USAE {header['model']}, but the "
                              f"model being trained is {model.config()}: pass another "
                              "checkpoint_path, or continue the saved one with "
                              "usae_checkpoint.load(path).")
    training = header.get("training")
    if training is None:
        raise CheckpointError(f"{path} holds a saved model but no training state; pass another "
                              "checkpoint_path to start a new run.")
    defaults = core.TrainConfig()  # for fields added after the checkpoint was written
    saved = {key: training["config"].get(key, getattr(defaults, key))
             for key in core.TrainConfig.MATH_FIELDS}
    differ = {key: (saved[key], getattr(config, key)) for key in core.TrainConfig.MATH_FIELDS
              if saved[key] != getattr(config, key)}
    if training["seed"] != trainer.seed:
        differ["seed"] = (training["seed"], trainer.seed)
    if training["total_steps"] != trainer.total_steps:
        differ["steps"] = (training["total_steps"], trainer.total_steps)
    if differ:
        raise CheckpointError(f"cannot resume {path}: these settings differ (checkpoint, now): "
                              f"{differ}. Use the checkpoint's settings, or another "
                              "checkpoint_path (or resume=False) to start afresh.")
    _load_model_state(model, header, tensors, path)
    _load_trainer_state(trainer, training, tensors)
    if trainer.step_count > trainer.total_steps:
        raise CheckpointError(f"{path} is at step {trainer.step_count}, past steps="
                              f"{trainer.total_steps}.")


def _stream_from(batches: Iterable, start: int) -> Iterator:
    """The batches from global step ``start`` on."""
    if hasattr(batches, "iter_from"):  # a loader that can seek without reading skipped data
        return batches.iter_from(start)
    return itertools.islice(core._epochs(batches), start, None)


def _checked(model: core.USAE, stream: Iterator, start: int) -> Iterator:
    """``stream`` (global steps ``start``, ...), each batch checked before the loop sees it."""
    for step, batch in enumerate(stream, start):
        checks.check_batch(model, batch, step)
        yield batch


def train(model: core.USAE, batches: Iterable[Mapping[str, Tensor]], steps: int, seed: int = 0,
          *, checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int = 0,
          resume: bool = True, loop: Callable[..., core.TrainResult] = core.train,
          **options: Any) -> core.TrainResult:
    """:func:`usae_core.train`, checked, monitored and resumable: the entry point of training.

    Arguments and every batch are checked before they are used; a
    :class:`usae_monitor.TrainingMonitor` writes the history rows. Beyond the core's arguments:

    Parameters
    ----------
    checkpoint_path : path, optional
        Where to write checkpoints. When it exists (and ``resume``), the run continues from it,
        provided it was written with the same model, seed, steps and ``MATH_FIELDS``. The run
        holds ``<checkpoint_path>.lock``: a second process training into the same file is
        refused, naming the holder (``usae_io.exclusive``).
    checkpoint_every : int
        Steps between checkpoints (0: only at the end, and when a bad batch stops the run).
    resume : bool
        Continue from ``checkpoint_path`` when it exists (False: start afresh, overwrite it).
    loop : callable
        ``loop(model, batches, steps, trainer=..., on_step=...)`` runs the steps:
        :func:`usae_core.train` (its batches are checked here first), or
        ``usae_distributed.train`` on every rank of a torchrun job, which checks every global
        batch itself (every rank resumes from the checkpoint; rank 0 writes it).
    """
    trainer = core.Trainer(model, checks.train_config(steps, seed, **options), steps, seed)
    if checkpoint_path is not None and not isinstance(checkpoint_path, (str, os.PathLike)):
        raise ValueError(f"checkpoint_path must be a file path or None, got {checkpoint_path!r}.")
    if not checks.is_int(checkpoint_every):
        raise ValueError(f"checkpoint_every must be an integer >= 0 (0: only at the end), got "
                         f"{checkpoint_every!r}.")
    if not isinstance(resume, bool):
        raise ValueError(f"resume must be True or False, got {resume!r}.")
    path = None if checkpoint_path is None else Path(checkpoint_path)
    writes = path is not None and _rank() == 0
    with contextlib.nullcontext() if path is None else usae_io.exclusive(
            path.with_name(path.name + ".lock"), f"training into {path.name}"):
        if writes:
            for stale in usae_io.stale_temporaries(path):  # left by a write that was killed
                stale.unlink(missing_ok=True)
        if path is not None and resume and path.exists():
            _resume(trainer, path)
        monitor = usae_monitor.TrainingMonitor()

        def after_step(trainer: core.Trainer, output: core.StepOutput) -> None:
            monitor(trainer, output)
            if writes and checkpoint_every and trainer.step_count % checkpoint_every == 0:
                _write(model, path, trainer)

        stream = _stream_from(batches, trainer.step_count)
        if loop is core.train:  # it trusts its batches; other loops are entry points that check
            stream = _checked(model, stream, trainer.step_count)
        try:
            result = loop(model, stream, steps, trainer=trainer, on_step=after_step)
        except (ValueError, TypeError):
            # A bad batch is refused before it changes anything: keep the work done so far.
            if writes and trainer.step_count > 0:
                _write(model, path, trainer)
            raise
        if writes:
            _write(model, path, trainer)
    return result


def _rank() -> int:
    """This process's rank in a torchrun job (0 without one): only rank 0 writes."""
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and \
        distributed.is_initialized() else 0


# ----------------------------------------------------------------------------------------------
# Folders to share: model.safetensors (the single-file checkpoint), config.json and a model card.


def _write_folder(model: core.USAE, folder: Path, metrics: Mapping[str, Any] | None) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, but a path without the .safetensors suffix names "
                         "a folder: name the file *.safetensors, or choose a folder path.")
    if metrics is not None:
        try:  # numpy and 0-d torch scalars become numbers (.item()); anything else is refused
            if not isinstance(metrics, Mapping):
                raise TypeError(f"got a {type(metrics).__name__}")
            text = json.dumps(metrics, indent=1, sort_keys=True, default=lambda v: v.item())
        except (TypeError, AttributeError, ValueError, RuntimeError) as error:
            raise ValueError("metrics must be a mapping of numbers, strings, lists and mappings, "
                             f"e.g. the content of metrics.json ({error}).") from error
        metrics = json.loads(text)
    _write(model, folder / WEIGHTS_NAME)
    config = _header(model)
    usae_io.atomic_write(folder / CONFIG_NAME, json.dumps(config, indent=1) + "\n")
    if metrics is not None:
        usae_io.atomic_write(folder / METRICS_NAME, text + "\n")
    elif (folder / METRICS_NAME).is_file():  # left by the run (usae_analysis.write_metrics)
        try:
            metrics = json.loads((folder / METRICS_NAME).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            metrics = None  # the card is written without numbers rather than not at all
    usae_io.atomic_write(folder / CARD_NAME, _model_card(config, metrics))


def _headline(metrics: Any, limit: int = 40) -> list[tuple[str, str]]:
    """(name, value) rows of the numbers and strings of ``metrics`` up to two levels deep, and of
    its short lists of numbers (one per model); longer lists stay in metrics.json."""
    rows: list[tuple[str, str]] = []

    def visit(prefix: str, value: Any, depth: int) -> None:
        numbers = isinstance(value, list) and 0 < len(value) <= 8 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if isinstance(value, Mapping) and depth < 2:
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item, depth + 1)
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool) or numbers:
            rows.append((prefix, ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                           for v in (value if numbers else [value]))))

    visit("", metrics if isinstance(metrics, Mapping) else {}, 0)
    return rows[:limit] + [("…", f"{len(rows) - limit} more in {METRICS_NAME}")] * (
        len(rows) > limit)


def _model_card(config: Mapping[str, Any], metrics: Any = None) -> str:
    """A README.md for a shared folder: what the model is, its files, how to load it."""
    model, stats = config["model"], config["standardization"]
    names = list(model["dims"])
    table = "\n".join(f"| `{name}` | {width} | {stats[name]['mean']:.6g} | "
                      f"{stats[name]['std']:.6g} |" for name, width in model["dims"].items())
    target = names[1] if len(names) > 1 else names[0]
    card = f"""---
library_name: usae
tags: [sparse-autoencoder, universal-sparse-autoencoder, interpretability]
---

# USAE over {", ".join(names)}

A Universal Sparse Autoencoder (Thasarathan et al., ICML 2025, arXiv:2502.03714): an encoder
(Linear, BatchNorm, ReLU, per-token TopK) and a unit-norm dictionary per model around
**{model["n_concepts"]} shared concepts**, **k = {model["k"]}** kept per token. Activations are
standardised inside the model by one scalar mean and std per model.

| model | width d | mean | std |
|---|---|---|---|
{table}

## Load it

With the USAE reference implementation (library version {config["library_version"]}):

```python
import usae_checkpoint

model = usae_checkpoint.load("path/to/this/folder")  # e.g. after huggingface-cli download
codes = model.encode("{names[0]}", acts)  # raw activations (tokens, d) -> codes (tokens, n)
recon = model.decode("{target}", codes)  # the same concepts in {target}'s space
```

## Files

- `{WEIGHTS_NAME}`: the weights, with `{CONFIG_NAME}` in its header and a sha256 (no pickle).
- `{CONFIG_NAME}`: the configuration, for reading without the library.
"""
    rows = _headline(metrics)
    if rows:
        card += f"- `{METRICS_NAME}`: every number of the run.\n\n## The run's numbers\n\n" \
            "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    return card
