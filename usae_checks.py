"""Validation at the boundary: the checks every public entry point shares.

Settings are checked once, where they enter (``usae_pipeline.Experiment``, ``usae_checkpoint.train``,
the cache and the loader), with messages that name the problem and the fix; ``usae_core`` then
trusts its callers and only asserts its invariants. The one exception is activations: the core's
``USAE.check_acts`` refuses NaN or inf before any encoder's BatchNorm can see them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch

import usae_core as core


def is_int(value: Any, minimum: int = 0) -> bool:
    """An ``int`` (not a ``bool``) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def require_positive_int(value: Any, what: str) -> None:
    if not is_int(value, 1):
        raise ValueError(f"{what} must be a positive integer, got {value!r}.")


def require_seed(seed: Any) -> None:
    """Seeds are integers in [0, 2**63), the range every torch and numpy generator takes."""
    if not is_int(seed) or seed >= 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}.")


def require_device(device: Any) -> None:
    """Refuse an unknown device, or a GPU that is not there, before any work starts."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"device {device!r} is not a torch device; use 'cpu' or "
                         "'cuda[:N]'.") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is visible; use "
                         "'cpu'.")


def check_usae(dims: Any, n_concepts: Any, k: Any) -> None:
    """Refuse a USAE configuration that ``usae_core.USAE`` cannot build."""
    if not isinstance(dims, Mapping) or not dims:
        raise ValueError("dims must be a non-empty mapping of model name -> width, "
                         "e.g. {'dinov2': 384, 'vit': 768}.")
    for name, width in dims.items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"model name {name!r} is not usable: use letters, digits and "
                             "underscores, not starting with a digit (e.g. 'dinov2_s14').")
        require_positive_int(width, f"the width of model {name!r}")
    require_positive_int(n_concepts, "n_concepts")
    require_positive_int(k, "k")
    if k >= n_concepts:
        raise ValueError(f"k={k} must be smaller than n_concepts={n_concepts}: TopK keeps k "
                         "of the n concepts per token (the paper uses k=32 of n=6144).")


def check_train_config(config: core.TrainConfig) -> None:
    """Refuse training options that are not what :class:`usae_core.TrainConfig` documents."""
    for key, allowed in core.CHOICES.items():
        if getattr(config, key) not in allowed:
            raise ValueError(f"{key}={getattr(config, key)!r} is not one of {sorted(allowed)}.")
    for key in ("aux_weight", "lr", "final_lr", "weight_decay", "grad_clip"):
        value, bound = getattr(config, key), "> 0" if key == "lr" else ">= 0"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
            raise ValueError(f"{key} must be a finite number {bound}, got {value!r}.")
    if config.warmup_steps is not None and not is_int(config.warmup_steps):
        raise ValueError(f"warmup_steps must be an integer >= 0, got {config.warmup_steps!r}.")
    if not isinstance(config.progress, bool):
        raise ValueError(f"progress must be True or False, got {config.progress!r}.")
    if config.sparse_decode is not None and not isinstance(config.sparse_decode, bool):
        raise ValueError(f"sparse_decode must be True, False or None (on a CPU only), got "
                         f"{config.sparse_decode!r}.")
    require_positive_int(config.log_every, "log_every")
    if config.device is not None:
        require_device(config.device)


def train_config(steps: Any, seed: Any, **options: Any) -> core.TrainConfig:
    """The checked :class:`usae_core.TrainConfig` of a run of ``steps`` steps."""
    fields = [f.name for f in dataclasses.fields(core.TrainConfig)]
    if set(options) - set(fields):
        raise TypeError(f"unknown training options {sorted(set(options) - set(fields))}; valid "
                        f"ones are {fields}.")
    require_positive_int(steps, "steps")
    require_seed(seed)
    config = core.TrainConfig(**options)
    check_train_config(config)
    return config


def check_batch(model: core.USAE, batch: Any, step: int) -> None:
    """Refuse a batch that is not model name -> finite ``tokens x width`` with the same tokens."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch {step} is a {type(batch).__name__}; each batch must be a dict "
                        "model name -> tensor (tokens x width).")
    missing, unknown = set(model.names) - set(batch), set(batch) - set(model.names)
    if missing or unknown:
        raise ValueError(f"batch {step} has models {sorted(batch)} but the USAE has "
                         f"{model.names}: missing {sorted(missing)}, unknown {sorted(unknown)}.")
    tokens = {name: batch[name].shape[0] for name in model.names}
    if len(set(tokens.values())) > 1:
        raise ValueError(f"batch {step} has different token counts per model {tokens}: row t of "
                         "every model must be the same image and position.")
    if next(iter(tokens.values())) < 2:
        raise ValueError(f"batch {step} has fewer than 2 tokens; BatchNorm needs a batch.")
    for name in model.names:
        try:
            model.check_acts(name, batch[name])
        except ValueError as error:
            raise ValueError(f"batch {step}: {error}") from None
