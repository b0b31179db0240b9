"""Data-parallel training of a USAE over several processes (``torchrun``), with one process's math.

N ranks given the same global batches compute what one process computes on them, up to float
rounding (paper Fig. 3 with the released code's details; issue 13, item 2):

- **the same source model at every step** on every rank: each rank's ``Trainer`` draws it from a
  generator seeded with ``seed``; :func:`train` checks that the ranks agree on the seed, the
  generator state, the options, the weights and the first global batch before the first step;
- **a contiguous 1/N slice** of every global batch per rank (:func:`local_slice`); a global batch
  that N ranks cannot split into equal slices is refused;
- **BatchNorm over the global batch**: :class:`GlobalBatchNorm1d` reduces the per-channel
  statistics across ranks in its output, its gradient and its running statistics;
- **gradients averaged across ranks** during the backward pass, before the core's per-model
  clipping and AdamW step see them. The element-mean losses of equal slices average to the
  global batch's loss, so the averaged gradient is the one-process gradient.

``loss="frobenius"`` (the norm of the whole residual, not a mean) is not a mean over ranks and is
refused. Every rank must be given the *same* global batches: this module slices them.

Usage (``torchrun --nproc_per_node N script.py``; plain ``python script.py`` runs one process)::

    ctx = usae_distributed.init()            # gloo on CPU, nccl on CUDA, from torchrun's env
    usae_distributed.train(model, global_batches, steps, seed=0, device=ctx.device,
                           checkpoint_path="usae.safetensors")  # rank 0 writes, all resume
    usae_distributed.close()
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

import usae_checkpoint as ckpt
import usae_checks as checks
import usae_core as core

BACKENDS = ("gloo", "nccl")
# Options that may differ between ranks: where each rank computes, and who shows progress.
_PER_RANK_OPTIONS = ("device", "progress")


class Context(NamedTuple):
    """This process's place in the job: ``rank`` of ``world_size``, its GPU and device."""

    rank: int
    world_size: int
    local_rank: int
    device: str


def world_size() -> int:
    """Processes in the job; 1 when no process group is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank; 0 when no process group is initialised (so rank 0 writes files)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init(backend: str | None = None) -> Context:
    """Join the process group that ``torchrun`` describes in the environment.

    Parameters
    ----------
    backend : {"gloo", "nccl"}, optional
        None: nccl when CUDA is available, else gloo.

    Returns
    -------
    Context
        ``device`` is ``cuda:<LOCAL_RANK>`` under nccl (made the current CUDA device), else
        ``cpu``. Without torchrun's variables (plain ``python script.py``) nothing is
        initialised and the context is rank 0 of 1, so the same script runs in one process.
        A second call returns the same context.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}.")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            return Context(0, 1, 0, "cuda" if torch.cuda.is_available() else "cpu")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise ValueError("backend='nccl' needs CUDA GPUs and none is visible; use "
                                 "backend='gloo' (CPU).")
            torch.cuda.set_device(local_rank)  # one GPU per process, before nccl touches any
        device_id = torch.device("cuda", local_rank) if backend == "nccl" else None
        dist.init_process_group(backend, init_method="env://", device_id=device_id)
    backend = dist.get_backend()
    device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device)


def close() -> None:
    """Leave the process group at the end of a script; nothing to do without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where tensors for a collective must live: nccl reduces CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


# ---- BatchNorm over the global batch ---------------------------------------------------------


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` that autograd differentiates: the gradient of each rank's input is the
    sum of every rank's output gradient. The same as ``torch.distributed.nn.functional.all_reduce``,
    which torch 2.13 deprecates with a warning at every call."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _SumOverRanks.apply(grad)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose batch statistics are those of the global batch across ranks.

    Where BatchNorm1d would use batch statistics (train mode), the per-channel sum and token count,
    then the centred sum of squares, are summed over ranks (two small all-reduces, the second
    centred so that a large mean costs no precision), and everything else is ``F.batch_norm``'s
    math: normalisation by the biased variance, running statistics updated with the unbiased one
    (global count), ``momentum`` (None: cumulative average) and ``num_batches_tracked``. The
    reductions are differentiable, so the gradient is the global batch's. In eval mode, or
    without a process group of more than one rank, it *is* BatchNorm1d. No parameter or buffer
    is added: state dicts (and checkpoints) are interchangeable with BatchNorm1d's.

    ``torch.nn.SyncBatchNorm`` does the same on GPUs only; this one also runs under gloo on CPU.
    """

    @classmethod
    def convert(cls, batch_norm: nn.BatchNorm1d) -> "GlobalBatchNorm1d":
        """A GlobalBatchNorm1d sharing ``batch_norm``'s parameters and buffers (the same tensor
        objects: optimizers built before the conversion still step them)."""
        assert type(batch_norm) is nn.BatchNorm1d, f"not a plain BatchNorm1d: {batch_norm!r}"
        new = cls(batch_norm.num_features, batch_norm.eps, batch_norm.momentum,
                  batch_norm.affine, batch_norm.track_running_stats,
                  device="meta")  # placeholders, every one replaced just below
        for name, parameter in batch_norm.named_parameters(recurse=False):
            setattr(new, name, parameter)
        for name, buffer in batch_norm.named_buffers(recurse=False):
            setattr(new, name, buffer)
        assert not any(t.is_meta for t in itertools.chain(new.parameters(), new.buffers()))
        return new.train(batch_norm.training)

    def forward(self, input: Tensor) -> Tensor:
        uses_batch_statistics = self.training or (self.running_mean is None
                                                  and self.running_var is None)
        if not uses_batch_statistics or world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.ndim))  # every dimension but the channels
        shape = [1, -1] + [1] * (input.ndim - 2)
        local_count = input.numel() // input.shape[1]
        # The count travels with the sums (one collective); exact in float32 below 2**24 tokens.
        sums = _SumOverRanks.apply(torch.cat([input.sum(dims),
                                              input.new_full((1,), local_count)]))
        total, count = sums[:-1], sums[-1]
        if local_count < 2 and count.item() < 2:  # the host sync only where it can fail
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{int(count.item())} over all ranks.")
        mean = total / count
        centred = input - mean.view(shape)
        variance = _SumOverRanks.apply(centred.square().sum(dims)) / count  # biased
        if self.training and self.track_running_stats:
            self._update_running_statistics(mean.detach(), variance.detach() * count
                                            / (count - 1))
        out = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running_statistics(self, mean: Tensor, unbiased_variance: Tensor) -> None:
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None \
            else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_variance, alpha=factor)


# ---- the model, the batches, the loop --------------------------------------------------------


def _gradient_averager(model: nn.Module) -> Callable[[Tensor], None]:
    """A post-accumulate-grad hook that replaces a parameter's gradient by its mean over ranks
    while ``model`` is in train mode. In eval mode it does nothing: a backward pass that one rank
    runs alone (activation maximisation, say) must not wait for ranks that are not there."""
    def average(parameter: Tensor) -> None:
        world = world_size()
        if model.training and world > 1:
            dist.all_reduce(parameter.grad)  # gloo has no AVG: sum, then divide
            parameter.grad.div_(world)
    return average


def make_data_parallel(model: core.USAE) -> core.USAE:
    """Make ``model`` train data-parallel, in place; a second call changes nothing.

    Every encoder's BatchNorm becomes a :class:`GlobalBatchNorm1d` (same parameters, buffers and
    state-dict keys), and every parameter averages its gradient over ranks as soon as backward has
    accumulated it, so that the core's clipping and AdamW step see the global gradient. Only the
    stepped parameters get gradients (the others are detached or off the graph), and every rank
    steps the same ones, so every rank makes the same all-reduces in the same order. Both happen
    in train mode only (``usae_core.train`` ends in eval mode): in eval mode, or without a
    process group of more than one rank, the model is the plain model, local to its rank.
    """
    if not isinstance(model, core.USAE):
        raise TypeError(f"make_data_parallel takes a usae_core.USAE, got {type(model).__name__}.")
    for pair in model.pairs.values():
        if not isinstance(pair.batch_norm, GlobalBatchNorm1d):
            pair.batch_norm = GlobalBatchNorm1d.convert(pair.batch_norm)
    if not getattr(model, "_gradient_averaging", False):
        for parameter in model.parameters():
            if parameter.requires_grad:  # a frozen parameter gets no gradient, nor a hook
                parameter.register_post_accumulate_grad_hook(_gradient_averager(model))
        model._gradient_averaging = True
    return model


def local_slice(batch: Mapping[str, Tensor], rank: int, world: int, *,
                step: int | None = None) -> dict[str, Tensor]:
    """Rank ``rank``'s contiguous 1/``world`` of every tensor (tokens x width) of a global batch.

    Raises ``ValueError`` when the global batch's token count is not divisible by ``world``:
    unequal slices would weigh the ranks' element means unequally.
    """
    if not (checks.is_int(world, 1) and checks.is_int(rank) and rank < world):
        raise ValueError(f"need integers 0 <= rank < world, got rank={rank!r}, world={world!r}.")
    tokens = {name: len(t) for name, t in batch.items()}
    if len(set(tokens.values())) != 1:
        raise ValueError(f"a global batch needs the same token count for every model, got "
                         f"{tokens}.")
    count = next(iter(tokens.values()))
    if count % world:
        where = "a global batch" if step is None else f"global batch {step}"
        raise ValueError(f"{where} has {count} tokens, which {world} ranks cannot split into "
                         f"equal slices: use a global batch size divisible by the number of "
                         f"processes (torchrun --nproc_per_node).")
    size = count // world
    return {name: t[rank * size:(rank + 1) * size] for name, t in batch.items()}


class _LocalBatches:
    """This rank's slices of the global batches, each global batch checked first.

    Re-iterable when the global batches are (the core runs one epoch per pass); the first pass
    continues ``started``, the iterator whose first batch :func:`train` has already looked at.
    """

    def __init__(self, model: core.USAE, global_batches: Iterable, started: Iterator,
                 first_step: int):
        self.model, self.global_batches, self.started = model, global_batches, started
        self.step = first_step  # the global step of the next batch, for messages
        self.rank, self.world = rank(), world_size()

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        stream = self.started if self.started is not None else iter(self.global_batches)
        self.started = None
        for batch in stream:
            # Every rank checks the same global batch, so a bad one stops all ranks together
            # instead of leaving the others waiting in a collective.
            checks.check_batch(self.model, batch, self.step)
            yield local_slice(batch, self.rank, self.world, step=self.step)
            self.step += 1


def _fingerprint(*parts: Any) -> int:
    """A crc32 of strings and tensors (their bytes), to compare ranks' values cheaply."""
    crc = 0
    for part in parts:
        if isinstance(part, Tensor):
            data = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        else:
            data = repr(part).encode()
        crc = zlib.crc32(data, crc)
    return crc


def _require_same_on_every_rank(fingerprints: Mapping[str, int]) -> None:
    """Refuse, on every rank at once, values whose fingerprints differ between ranks."""
    if world_size() == 1:
        return
    values = torch.tensor(list(fingerprints.values()), dtype=torch.int64)
    # One MAX over (x, -x) gives the largest and the smallest value of every rank.
    extremes = torch.cat([values, -values]).to(_collective_device())
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    highest, lowest = extremes.cpu().chunk(2)
    differ = [what for what, hi, lo in zip(fingerprints, highest, -lowest) if hi != lo]
    if differ:
        raise ValueError(f"the ranks differ in {', '.join(differ)}: every rank must build the "
                         "same model, pass the same seed, steps and options, and iterate the "
                         "same global batches (this module slices them per rank).")


def _require_same_run(trainer: core.Trainer, first: Mapping[str, Tensor]) -> None:
    """Refuse ranks that would not compute one run: the source drawn at every step follows from
    the generator, and the BatchNorm and gradient all-reduces pair up only if every rank steps
    the same model on the same data."""
    model = trainer.model
    settings = {key: value for key, value in dataclasses.asdict(trainer.config).items()
                if key not in _PER_RANK_OPTIONS}
    _require_same_on_every_rank({
        "seed, steps or options": _fingerprint(trainer.seed, trainer.total_steps,
                                               trainer.step_count, sorted(settings.items()),
                                               trainer.generator.get_state()),
        "model weights or standardisation": _fingerprint(*model.state_dict().values()),
        "the first global batch": _fingerprint(*(first[name] for name in model.names))})


def train(model: core.USAE, global_batches: Iterable[Mapping[str, Tensor]], steps: int,
          seed: int = 0, *, trainer: core.Trainer | None = None,
          on_step: Callable[[core.Trainer, core.StepOutput], None] | None = None,
          checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int = 0,
          resume: bool = True, **options: Any) -> core.TrainResult:
    """:func:`usae_core.train` on this rank's slice of every global batch, data-parallel.

    Call it on every rank with the same arguments. Without a process group of more than one
    rank it is ``usae_core.train`` with its arguments and batches checked.

    Parameters
    ----------
    model : usae_core.USAE
        The same model on every rank (build it with the same ``seed``); made data-parallel here
        (:func:`make_data_parallel`).
    global_batches : iterable of dict
        The *global* batches, the same on every rank: model name -> raw activations (tokens x
        width), tokens divisible by the number of ranks. Re-iterable sources run several epochs.
    steps, seed, options
        As :func:`usae_core.train` (``seed``: the draw of source models, the same everywhere).
        ``progress`` defaults to rank 0 only; ``device`` is this rank's (``init().device``).
    trainer : usae_core.Trainer, optional
        To continue a run (e.g. restored from a checkpoint on every rank); then no ``options``.
    on_step : callable, optional
        ``on_step(trainer, output)`` after every step on every rank; ``output.losses`` are the
        global batch's (the mean of the ranks'), its targets, recons and encoding this rank's.
    checkpoint_path, checkpoint_every, resume
        As :func:`usae_checkpoint.train`, which then drives this loop: every rank resumes from
        the checkpoint (a path all ranks can read), rank 0 writes it; the history's loss is the
        global batch's, its R² and dead fractions rank 0's slice's.

    Notes
    -----
    The standardisation, unless already set, is fitted on the first *global* batch, on every rank
    alike, as one process fits it; ``dictionary_init="tokens"`` draws from the global first batch.
    """
    world, here = world_size(), rank()
    if not isinstance(model, core.USAE):
        raise TypeError(f"train takes a usae_core.USAE, got {type(model).__name__}.")
    if checkpoint_path is not None:
        if trainer is not None or on_step is not None:
            raise ValueError("with checkpoint_path, usae_checkpoint.train makes the trainer and "
                             "the step hook: pass neither trainer nor on_step.")
        options.setdefault("progress", here == 0)
        return ckpt.train(model, global_batches, steps, seed, checkpoint_path=checkpoint_path,
                          checkpoint_every=checkpoint_every, resume=resume, loop=train, **options)
    if trainer is None:
        options.setdefault("progress", here == 0)
        trainer = core.Trainer(model, checks.train_config(steps, seed, **options), steps, seed)
    elif options:
        raise ValueError(f"pass options or a trainer, not both: the trainer already has its "
                         f"options (got {sorted(options)}).")
    elif trainer.model is not model or steps != trainer.total_steps:
        raise ValueError(f"the trainer must be this model's, for the same steps (it has "
                         f"{trainer.total_steps}, got steps={steps!r}).")
    config, device = trainer.config, next(model.parameters()).device
    if world > 1 and config.loss == "frobenius":
        raise ValueError("loss='frobenius' is the norm of the whole residual, not a mean over "
                         "tokens, so ranks cannot compute it from their slices: use loss="
                         "'l1_aux' or 'mse' with several processes, or train in one process.")
    if world > 1 and dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"the nccl backend reduces CUDA tensors, but the model is on {device}: "
                         "pass device=init().device.")
    make_data_parallel(model)

    started = iter(global_batches)
    first = next(started, None)
    if first is not None:
        checks.check_batch(model, first, trainer.step_count)
        started = itertools.chain([first], started)
        if not model.standardization_fitted:
            model.fit_standardization(first)  # the global batch: what one process fits
        if world > 1:
            _require_same_run(trainer, first)
        if trainer.step_count == 0 and not trainer.initial_dictionaries:
            # From the global first batch, as one process does (not this rank's slice).
            trainer.initialise({name: model.standardize(name, first[name].to(device, torch.float32))
                                for name in model.names})

    def with_global_losses(trainer: core.Trainer, output: core.StepOutput) -> None:
        losses = output.losses.clone()
        dist.all_reduce(losses)  # equal slices: the mean of the ranks' means
        on_step(trainer, output._replace(losses=losses / world))

    hook = with_global_losses if on_step is not None and world > 1 else on_step
    batches = _LocalBatches(model, global_batches, started, trainer.step_count)
    return core.train(model, batches, steps, trainer=trainer, on_step=hook)

