"""What training did: the history rows of a run, written by an ``on_step`` hook.

A figure that shows no effect starts here: a run whose loss did not fall, whose dictionary rows
still point where they started, or whose concepts never fire has learned nothing.
:class:`TrainingMonitor` accumulates every step's numbers on the device and writes one row to
``trainer.history`` every ``log_every`` steps (the loop's only host synchronisations):

- ``loss``, ``loss_by_target``: the mean per-target training loss over the interval;
- ``steps_by_source``, ``lr``: how often each model was the source, and each model's lr now;
- ``r2``: source -> target -> the training-batch R^2 (released form, scalar frame);
- ``dead_fraction``: per source drawn in the interval, the share of concepts its encoder never
  fired; ``dead_fraction_all``: never fired by any encoder (None unless every model was drawn);
- ``dictionary_cosine_to_init``: per model, the median cosine of each row with its start.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

import usae_core as core


def dictionary_cosine_to_init(model: core.USAE,
                              initial: Mapping[str, Tensor]) -> dict[str, float | None]:
    """Per model, the median over concepts of the cosine between each dictionary row now and at
    the start (1: nothing moved); ``None`` where the start is unknown."""
    return {name: None if name not in initial else
            (model.dictionary(name).detach() * initial[name]).sum(dim=1).median().item()
            for name in model.names}


def released_variance(target: Tensor, offset: Tensor) -> Tensor:
    """The variance over every entry of ``target + offset`` (tokens x d, plus a per-channel
    offset: the batch in the released, scalar frame), in two passes without a temporary."""
    channel_means = target.mean(dim=0)
    second_moment = torch.linalg.vector_norm(target).square() / target.numel()
    return (second_moment + 2 * (offset * channel_means).mean() + offset.square().mean()
            - (channel_means + offset).mean().square())


class TrainingMonitor:
    """``on_step`` hook of :func:`usae_core.train` that writes the run's history rows."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}

    def _reset(self, model: core.USAE) -> None:
        device, m = next(model.parameters()).device, len(model.names)
        self._sums = {"loss": torch.zeros(m, device=device),
                      "r2": torch.zeros(m, m, device=device),  # source x target
                      "source_steps": torch.zeros(m, device=device),
                      "fires": torch.zeros(m, model.n_concepts, dtype=torch.long, device=device)}

    @torch.no_grad()
    def __call__(self, trainer: core.Trainer, output: core.StepOutput) -> None:
        model, sums = trainer.model, self._sums
        if not sums:
            self._reset(model)
            sums = self._sums
        row = model.names.index(output.source)
        # The mse loss is the error already: a pass over the residuals saved per target.
        errors = dict(zip(output.targets, output.losses)) if trainer.config.loss == "mse" else {
            name: F.mse_loss(output.recons[name], target)
            for name, target in output.targets.items()}
        for column, name in enumerate(model.names):
            variance = released_variance(output.targets[name], model.scalar_frame_offset(name))
            sums["r2"][row, column] += 1 - errors[name] / (variance + 1e-6)
        sums["loss"] += output.losses
        sums["source_steps"][row] += 1
        encoding = output.encoding
        fired = encoding.indices[encoding.codes.gather(-1, encoding.indices)
                                 > core.FIRING_THRESHOLD]
        sums["fires"][row] += torch.bincount(fired, minlength=model.n_concepts)
        if trainer.step_count % trainer.config.log_every == 0 or \
                trainer.step_count == trainer.total_steps:
            trainer.history.append(self._row(trainer))
            self._reset(model)

    def _row(self, trainer: core.Trainer) -> dict:
        names, sums = trainer.model.names, self._sums
        steps = sums["source_steps"].tolist()
        losses = (sums["loss"] / sum(steps)).tolist()
        r2, fires = sums["r2"].tolist(), sums["fires"].cpu()
        seen = [i for i, count in enumerate(steps) if count > 0]
        return {"step": trainer.step_count, "loss": sum(losses),
                "loss_by_target": dict(zip(names, losses)),
                "steps_by_source": {name: int(count) for name, count in zip(names, steps)},
                "lr": {name: trainer.lr(name) for name in names},
                "r2": {names[i]: {t: r2[i][j] / steps[i] for j, t in enumerate(names)}
                       for i in seen},
                "dead_fraction": {names[i]: (fires[i] == 0).double().mean().item() for i in seen},
                "dead_fraction_all": (fires.sum(dim=0) == 0).double().mean().item()
                if len(seen) == len(names) else None,
                "dictionary_cosine_to_init":
                    dictionary_cosine_to_init(trainer.model, trainer.initial_dictionaries)}
