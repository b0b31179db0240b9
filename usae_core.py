"""Universal Sparse Autoencoders (Thasarathan et al., ICML 2025): model, losses, training loop.

A USAE learns one sparse concept space shared by M models. Model ``i`` has an encoder
(Linear -> BatchNorm -> ReLU -> per-token TopK) into ``n`` shared concepts and a dictionary
``D_i`` (n x d_i, unit-norm rows) out of them, so the codes of any model reconstruct the
activations of every model. Each training step draws one source model, encodes its tokens and
decodes them into all M models (paper Fig. 3).

This module imports nothing else of the project. Everything here works in the *standardised*
space of each model (one scalar mean and std per model, as the released code); ``encode`` and
``decode`` apply the standardisation on the way in and out unless told the input already is.

Paper-versus-code choices (see README): the loss defaults to the released code's criterion
(element-mean L1 plus 0.1 x an auxiliary term), the update rule to the released one (only the
drawn model's encoder and decoder change), and the learning-rate schedule to the paper text
(warm-up then cosine decay to 1e-6 over the whole run). The alternatives are named options.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

__version__ = "0.1.0"
CHECKPOINT_FORMAT = "usae-checkpoint/1"
STD_EPS = 1e-5  # (x - mean) / (std + 1e-5), as the released code
DICTIONARY_EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# Model


class Encoding(NamedTuple):
    """What an encoder computes for a batch of tokens.

    Attributes
    ----------
    pre_codes : Tensor
        BatchNorm output before the ReLU, ``tokens x n``. The auxiliary loss and activation
        maximisation need it: TopK gives no gradient to a concept outside the top k.
    codes : Tensor
        Dense codes ``tokens x n``: ReLU then TopK, so every entry is >= 0 and at most k per
        token are non-zero (exactly k unless fewer than k pre-codes are positive).
    indices : Tensor
        ``tokens x k`` indices of the selected concepts, in no particular order.
    """

    pre_codes: Tensor
    codes: Tensor
    indices: Tensor


class ModelPair(nn.Module):
    """Encoder and dictionary of one model, plus its standardisation statistics."""

    def __init__(self, width: int, n_concepts: int):
        super().__init__()
        self.linear = nn.Linear(width, n_concepts)
        self.batch_norm = nn.BatchNorm1d(n_concepts)
        # Raw weights; the dictionary is their row-normalised form, recomputed at every use (a
        # reparameterisation, as the released code), so every concept vector has unit norm.
        self.raw_dictionary = nn.Parameter(torch.randn(n_concepts, width))
        self.register_buffer("act_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("act_std", torch.ones((), dtype=torch.float64))
        # Per-channel mean minus act_mean: zero under the released scalar standardisation; with
        # channel centring it plays the role of the paper's b_pre (Eq. 1), fixed to the data mean.
        self.register_buffer("channel_offset", torch.zeros(width))

    def dictionary(self) -> Tensor:
        norms = self.raw_dictionary.norm(dim=1, keepdim=True)
        return self.raw_dictionary / (norms + DICTIONARY_EPS)


def _is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.")
    return value


class USAE(nn.Module):
    """A universal sparse autoencoder over several models.

    Parameters
    ----------
    dims : mapping of str to int
        Model name -> activation width ``d``. Names must be valid identifiers (they become
        parameter names). One model gives an ordinary (independent) TopK SAE.
    n_concepts : int
        Width ``n`` of the shared code (paper: 6144 = 8 x 768).
    k : int
        Concepts kept per token (released code: 32); ``1 <= k < n``.
    seed : int, optional
        Seeds the initialisation; ``None`` uses torch's global generator.
    """

    def __init__(self, dims: Mapping[str, int], n_concepts: int, k: int, *, seed: int | None = None):
        super().__init__()
        if not isinstance(dims, Mapping) or not dims:
            raise ValueError("dims must be a non-empty mapping of model name -> width, "
                             "e.g. {'dinov2': 384, 'vit': 768}.")
        for name, width in dims.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"model name {name!r} is not usable: use letters, digits and "
                                 "underscores, not starting with a digit (e.g. 'dinov2_s14').")
            _positive_int(width, f"the width of model {name!r}")
        _positive_int(n_concepts, "n_concepts")
        _positive_int(k, "k")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}.")
        if k >= n_concepts:
            raise ValueError(f"k={k} must be smaller than n_concepts={n_concepts}: TopK keeps k "
                             "of the n concepts per token (the paper uses k=32 of n=6144).")
        self.dims = dict(dims)
        self.n_concepts = n_concepts
        self.k = k
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.pairs = nn.ModuleDict({name: ModelPair(w, n_concepts) for name, w in dims.items()})
        self.register_buffer("standardization_fitted", torch.tensor(False))

    @property
    def names(self) -> list[str]:
        return list(self.dims)

    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable."""
        return {"dims": dict(self.dims), "n_concepts": self.n_concepts, "k": self.k}

    def _pair(self, name: str) -> ModelPair:
        if name not in self.dims:
            raise KeyError(f"unknown model {name!r}; this USAE knows {self.names}.")
        return self.pairs[name]

    def _check_acts(self, name: str, acts: Tensor) -> None:
        width = self._pair(name).linear.in_features
        if acts.ndim != 2 or acts.shape[1] != width:
            raise ValueError(f"model {name!r} takes activations of shape (tokens, {width}), got "
                             f"{tuple(acts.shape)}: flatten images x positions into tokens and "
                             "check the model name.")

    # -- standardisation ------------------------------------------------------------------------

    def standardization(self) -> dict[str, tuple[float, float]]:
        """Model name -> (mean, std) scalars applied on the way in and out."""
        return {n: (p.act_mean.item(), p.act_std.item()) for n, p in self.pairs.items()}

    def set_standardization(self, stats: Mapping[str, tuple[float, float]],
                            channel_means: Mapping[str, Tensor] | None = None) -> None:
        """Set the scalar mean and std of every model (e.g. from an activation cache).

        With ``channel_means`` (model name -> per-channel mean of the raw activations), every
        channel is also centred on its own mean: the USAE then spends no concept on the mean
        activation, which a CNN's final map (a large, channel-dependent offset) otherwise costs.
        The scale stays the one scalar std, so directions and relative norms are kept.
        """
        missing = set(self.dims) - set(stats)
        if missing:
            raise ValueError(f"standardisation statistics are missing for {sorted(missing)}.")
        offsets = {}
        for name in self.dims:
            mean, std = (float(v) for v in stats[name])
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(f"standardisation of {name!r} needs a finite mean and a "
                                 f"positive std, got mean={mean}, std={std}.")
            offsets[name] = torch.zeros(self.dims[name])
            if channel_means is not None:
                means = torch.as_tensor(channel_means[name], dtype=torch.float64).flatten()
                if means.shape != (self.dims[name],) or not torch.isfinite(means).all():
                    raise ValueError(f"channel means of {name!r} must be {self.dims[name]} "
                                     f"finite values, got shape {tuple(means.shape)}.")
                offsets[name] = (means - mean).float()
        for name in self.dims:
            pair = self.pairs[name]
            pair.act_mean.fill_(float(stats[name][0]))
            pair.act_std.fill_(float(stats[name][1]))
            pair.channel_offset.copy_(offsets[name])
        self.standardization_fitted.fill_(True)

    def fit_standardization(self, sample: Mapping[str, Tensor], *,
                            centre_channels: bool = False) -> dict[str, tuple[float, float]]:
        """Fit one scalar mean and (unbiased) std per model over every entry of ``sample``
        (and, with ``centre_channels``, the per-channel means; see :meth:`set_standardization`)."""
        stats, means = {}, {}
        for name in self.dims:
            if name not in sample:
                raise ValueError(f"the standardisation sample has no activations of {name!r}.")
            self._check_acts(name, sample[name])
            values = sample[name].detach().to(torch.float64)
            stats[name] = (values.mean().item(), values.std().item())
            means[name] = values.mean(dim=0)
        self.set_standardization(stats, means if centre_channels else None)
        return stats

    @property
    def channel_centred(self) -> bool:
        """Whether the standardisation also centres every channel on its own mean."""
        return any(bool(p.channel_offset.any()) for p in self.pairs.values())

    def standardize(self, name: str, acts: Tensor) -> Tensor:
        pair = self._pair(name)
        return (acts - pair.act_mean.float() - pair.channel_offset) / (pair.act_std.float()
                                                                        + STD_EPS)

    def unstandardize(self, name: str, acts: Tensor) -> Tensor:
        pair = self._pair(name)
        return (acts * (pair.act_std.float() + STD_EPS) + pair.act_mean.float()
                + pair.channel_offset)

    def scalar_frame_offset(self, name: str) -> Tensor:
        """What turns standardised values into the released scalar standardisation's values.

        ``standardize(a) + offset == (a - mean) / (std + eps)``: zero unless channels are
        centred. Metrics that the paper reports in its frame (the global-mean R^2) add it to
        both the target and the reconstruction.
        """
        pair = self._pair(name)
        return pair.channel_offset / (pair.act_std.float() + STD_EPS)

    # -- encode / decode ------------------------------------------------------------------------

    def encode_full(self, name: str, acts: Tensor, *, standardized: bool = False) -> Encoding:
        """Encode ``acts`` (tokens x d) of model ``name``; see :class:`Encoding`."""
        self._check_acts(name, acts)
        x = acts if standardized else self.standardize(name, acts)
        pre_codes, _, values, indices = self._encode(name, x)
        codes = torch.zeros_like(pre_codes).scatter(-1, indices, values)
        return Encoding(pre_codes, codes, indices)

    def _encode(self, name: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pre-codes, their ReLU, and the values and indices of its top k (standardised input)."""
        pair = self.pairs[name]
        # Under bf16 autocast only the matmul runs in bf16; BatchNorm gets the input's dtype.
        pre_codes = pair.batch_norm(pair.linear(x).to(x.dtype))
        activated = F.relu(pre_codes)
        values, indices = torch.topk(activated, self.k, dim=-1, sorted=False)
        return pre_codes, activated, values, indices

    def encode(self, name: str, acts: Tensor, *, standardized: bool = False) -> Tensor:
        """Dense codes (tokens x n, >= 0, k selected per token) of model ``name``'s tokens."""
        return self.encode_full(name, acts, standardized=standardized).codes

    def dictionary(self, name: str) -> Tensor:
        """Model ``name``'s dictionary: n x d, every row of unit L2 norm."""
        return self._pair(name).dictionary()

    def decode(self, name: str, codes: Tensor, *, standardized: bool = False) -> Tensor:
        """Reconstruct model ``name``'s activations from codes (tokens x n) of any model."""
        if codes.ndim != 2 or codes.shape[1] != self.n_concepts:
            raise ValueError(f"codes must have shape (tokens, {self.n_concepts}), "
                             f"got {tuple(codes.shape)}.")
        recon = codes @ self.dictionary(name)
        return recon if standardized else self.unstandardize(name, recon)

    def forward(self, source: str, acts: Tensor) -> dict[str, Tensor]:
        """Encode ``source``'s tokens and decode them into every model."""
        codes = self.encode(source, acts)
        return {name: self.decode(name, codes) for name in self.dims}


# ----------------------------------------------------------------------------------------------
# Losses: pure functions of one signature (target, recon, pre_codes, codes, dictionary).


def l1_aux_loss(target: Tensor, recon: Tensor, pre_codes: Tensor, codes: Tensor,
                dictionary: Tensor, aux_weight: float = 0.1) -> Tensor:
    """The released code's criterion: element-mean L1 plus an auxiliary L1 term.

    The auxiliary term asks the top half (n // 2) of the *non-selected* ReLU'd pre-codes to
    predict the residual, which keeps unselected concepts learning. As released, the residual
    is not detached, so the auxiliary term also shapes the main reconstruction.
    """
    residual = target - recon
    leftover = F.relu(pre_codes) - codes  # zero exactly where TopK selected
    values, indices = torch.topk(leftover, leftover.shape[-1] // 2, dim=-1, sorted=False)
    aux_codes = torch.zeros_like(leftover).scatter(-1, indices, values)
    aux = (residual - aux_codes @ dictionary).abs().mean()
    return residual.abs().mean() + aux_weight * aux


def frobenius_loss(target: Tensor, recon: Tensor, pre_codes: Tensor, codes: Tensor,
                   dictionary: Tensor) -> Tensor:
    """The paper text's loss (Eq. 5, Fig. 3): the Frobenius norm of the residual, not squared."""
    return torch.linalg.matrix_norm(target - recon)


def mse_loss(target: Tensor, recon: Tensor, pre_codes: Tensor, codes: Tensor,
             dictionary: Tensor) -> Tensor:
    """Element-mean squared error."""
    return (target - recon).square().mean()


LOSSES: dict[str, Callable[..., Tensor]] = {
    "l1_aux": l1_aux_loss, "frobenius": frobenius_loss, "mse": mse_loss}
DICTIONARY_INITS = ("randn", "unit", "tokens")
FIRING_THRESHOLD = 0.1  # a concept fires on a token when its code exceeds this (released tau)


# ----------------------------------------------------------------------------------------------
# Training configuration and learning-rate schedule


@dataclass
class TrainConfig:
    """Every option of :func:`train`; saved with each checkpoint.

    Attributes
    ----------
    loss : {"l1_aux", "frobenius", "mse"}
        ``l1_aux`` is the released code's criterion (default), ``frobenius`` the paper text's.
    aux_weight : float
        Weight of the auxiliary term of ``l1_aux`` (released: 0.1).
    update : {"released", "all_decoders"}
        ``released``: a step with source i changes only encoder i and decoder i (default).
        ``all_decoders``: every decoder also learns from its reconstruction term at every step.
    schedule : {"paper", "released"}
        ``paper``: linear warm-up then cosine decay to ``final_lr`` over the run, on the global
        step (default). ``released``: each model's schedule advances only when its optimizer
        steps, and its first update uses ``lr`` (so the run ends near 2.3e-4, not 1e-6).
    lr, final_lr, weight_decay : float
        Per-model AdamW (released: 3e-4, 1e-6, 1e-5).
    warmup_steps : int or None
        Linear warm-up length; ``None`` means ``steps // 30`` (released: 1 of 30 epochs).
    grad_clip : float
        Global-norm gradient clip applied per model; 0 disables.
    log_every : int
        Steps between metric read-outs (the only host synchronisations of the loop).
    checkpoint_path : str or None
        Where to write checkpoints; the run resumes from it when it exists and ``resume``.
    checkpoint_every : int
        Steps between checkpoints (0: only at the end).
    resume : bool
        Resume from ``checkpoint_path`` when it exists.
    device : str or None
        Where to train; ``None`` keeps the model where it is.
    progress : bool
        Show a progress bar.
    precision : {"fp32", "bf16"}
        ``fp32`` as released (default). ``bf16`` runs the encoder and decoder matmuls under
        bf16 autocast; BatchNorm, TopK, losses and metrics stay fp32. Faster where bf16
        matmuls are (GPUs, recent CPUs), but it changes results beyond rounding.
    dictionary_init : {"randn", "unit", "tokens"}
        ``randn``: raw rows ``torch.randn`` (norm about sqrt(d)), as released (default). Adam
        moves each raw entry by about ``lr`` per step, so such rows turn by only about
        ``lr * steps / sqrt(d)`` radians: a short run barely leaves its random start.
        ``unit``: the same random directions rescaled to unit norm, so the same steps turn them
        sqrt(d) times faster. ``tokens``: row c of every model's dictionary is that model's
        standardised token at the same randomly drawn row of the first batch (one draw shared by
        all models, so concept c starts as "what every model sees at token t_c").
    encoder_init : {"default", "transpose"}
        ``default``: PyTorch's Linear initialisation, as released. ``transpose``: every
        encoder starts as its dictionary's transpose (zero bias), as Gao et al. (2024), so that
        concept c first fires where a token points along its dictionary row.
    sparse_decode : bool
        Decode the k selected concepts of each token as a weighted sum of k dictionary rows
        (``F.embedding_bag``) instead of a dense ``codes @ D``: the same values up to float
        rounding and n / k times fewer FLOPs for that decode (the auxiliary term stays dense),
        but a memory-bound gather, so measure on the target device
        (``benchmarks/train_throughput.py``). Default off.
    """

    loss: str = "l1_aux"
    aux_weight: float = 0.1
    update: str = "released"
    schedule: str = "paper"
    lr: float = 3e-4
    final_lr: float = 1e-6
    weight_decay: float = 1e-5
    warmup_steps: int | None = None
    grad_clip: float = 1.0
    log_every: int = 100
    checkpoint_path: str | None = None
    checkpoint_every: int = 0
    resume: bool = True
    device: str | None = None
    progress: bool = True
    precision: str = "fp32"
    sparse_decode: bool = False
    dictionary_init: str = "randn"
    encoder_init: str = "default"

    def validate(self) -> None:
        choices = {"loss": LOSSES, "update": ("released", "all_decoders"),
                   "schedule": ("paper", "released"), "precision": ("fp32", "bf16"),
                   "dictionary_init": DICTIONARY_INITS, "encoder_init": ("default", "transpose")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {sorted(allowed)}.")
        for key in ("aux_weight", "lr", "final_lr", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}.")
        if self.warmup_steps is not None and not _is_count(self.warmup_steps):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}.")
        for key in ("resume", "progress", "sparse_decode"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}.")
        _positive_int(self.log_every, "log_every")
        if not _is_count(self.checkpoint_every):
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0: only at the end), "
                             f"got {self.checkpoint_every!r}.")
        if self.checkpoint_path is not None and not isinstance(self.checkpoint_path,
                                                               (str, os.PathLike)):
            raise ValueError(f"checkpoint_path must be a file path or None, "
                             f"got {self.checkpoint_path!r}.")
        if self.device is not None:
            try:
                kind = torch.device(self.device).type
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"device {self.device!r} is not a torch device; use 'cpu' or "
                                 "'cuda[:N]'.") from error
            if kind == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r}: no CUDA GPU is visible; use 'cpu'.")

    # Options that change what a run computes: a resumed run must agree on all of them.
    # sparse_decode is not one: it changes only the float rounding, like the device does.
    MATH_FIELDS = ("loss", "aux_weight", "update", "schedule", "lr", "final_lr",
                   "weight_decay", "warmup_steps", "grad_clip", "precision", "dictionary_init",
                   "encoder_init")


def scheduled_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                 final_lr: float) -> float:
    """Linear warm-up from ``final_lr`` to ``base_lr``, then cosine decay back to ``final_lr``."""
    if step < warmup_steps:
        return final_lr + (base_lr - final_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Trainer


class TrainResult(NamedTuple):
    """What :func:`train` returns: the trained model and one history row per log interval."""

    model: USAE
    history: list[dict]
    step: int


_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


class Trainer:
    """Per-model AdamW optimizers, the schedule and the source-drawing generator of one run.

    :func:`train` is the entry point; this class exists so that a single step can be driven
    and inspected (tests, benchmarks).
    """

    def __init__(self, model: USAE, config: TrainConfig, total_steps: int, seed: int):
        config.validate()
        self.model, self.config, self.total_steps, self.seed = model, config, total_steps, seed
        self.warmup_steps = (total_steps // 30 if config.warmup_steps is None
                             else config.warmup_steps)
        self.loss_fn = LOSSES[config.loss]
        # One fused kernel per update instead of a loop of small ops per parameter (about 4x
        # faster on CPU at the paper's sizes); the same update up to float rounding.
        fused = True if next(model.parameters()).device.type in ("cpu", "cuda") else None
        self.optimizers = {
            name: torch.optim.AdamW(model.pairs[name].parameters(), lr=config.lr,
                                    weight_decay=config.weight_decay, fused=fused)
            for name in model.names}
        self.updates = dict.fromkeys(model.names, 0)  # optimizer steps taken per model
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.history: list[dict] = []  # one row per log interval, kept across resumes
        # The dictionaries right after initialisation: how far training moved them is the first
        # thing to check (a run whose rows still point where they started has learned nothing).
        self.initial_dictionaries: dict[str, Tensor] = {}
        device = next(model.parameters()).device
        m, n = len(model.names), model.n_concepts
        self._r2_sums = torch.zeros(m, m, device=device)  # source x target, this interval
        self._source_steps = torch.zeros(m, device=device)
        self._fires = torch.zeros(m, n, dtype=torch.long, device=device)

    @torch.no_grad()
    def initialise(self, batch: Mapping[str, Tensor]) -> None:
        """Apply ``dictionary_init`` and ``encoder_init`` using the first standardised batch,
        and keep the dictionaries they give as the reference of the movement measure."""
        model, cfg = self.model, self.config
        if cfg.dictionary_init == "tokens":
            tokens = len(next(iter(batch.values())))
            if tokens < model.n_concepts:
                raise ValueError(f"dictionary_init='tokens' draws n_concepts={model.n_concepts} "
                                 f"tokens from the first batch, which has {tokens}: use "
                                 "batches of at least n_concepts tokens, or another init.")
            # Its own generator, so that the draw of source models does not depend on the init.
            draw = torch.Generator().manual_seed(self.seed + 1)
            rows = torch.randperm(tokens, generator=draw)[:model.n_concepts]
        for name, pair in model.pairs.items():
            raw = pair.raw_dictionary
            if cfg.dictionary_init == "unit":
                raw.div_(raw.norm(dim=1, keepdim=True) + DICTIONARY_EPS)
            elif cfg.dictionary_init == "tokens":
                chosen = batch[name][rows.to(raw.device)].to(raw.dtype)
                raw.copy_(chosen / (chosen.norm(dim=1, keepdim=True) + DICTIONARY_EPS))
            if cfg.encoder_init == "transpose":
                pair.linear.weight.copy_(pair.dictionary())
                pair.linear.bias.zero_()
        self.initial_dictionaries = {name: model.dictionary(name).detach().clone()
                                     for name in model.names}

    def dictionary_cosine_to_init(self) -> dict[str, float | None]:
        """Per model, the median over concepts of the cosine between each dictionary row now and
        right after initialisation (1: nothing moved); ``None`` when the start is unknown."""
        result = {}
        for name in self.model.names:
            start = self.initial_dictionaries.get(name)
            result[name] = None if start is None else (
                (self.model.dictionary(name).detach() * start).sum(dim=1).median().item())
        return result

    @torch.no_grad()
    def _track(self, source: str, targets: Mapping[str, Tensor], recons: Mapping[str, Tensor],
               indices: Tensor, values: Tensor) -> None:
        """Accumulate this step's training-batch R^2 (released form, in the scalar frame) and
        firings on the device; :meth:`read_interval` turns them into a history row."""
        names = self.model.names
        row = names.index(source)
        for column, name in enumerate(names):
            offset = self.model.scalar_frame_offset(name)
            error = (targets[name] - recons[name]).square().mean()
            variance = (targets[name] + offset).var(unbiased=False)
            self._r2_sums[row, column] += 1 - error / (variance + 1e-6)
        self._source_steps[row] += 1
        fired = indices[values > FIRING_THRESHOLD]
        self._fires[row] += torch.bincount(fired, minlength=self.model.n_concepts)

    def read_interval(self) -> dict:
        """R^2 matrix, dead fractions and dictionary movement since the last call; resets."""
        names = self.model.names
        steps = self._source_steps.tolist()
        r2 = self._r2_sums.tolist()
        fires = self._fires.cpu()
        seen = [i for i, count in enumerate(steps) if count > 0]
        row = {"r2": {names[i]: {t: r2[i][j] / steps[i] for j, t in enumerate(names)}
                      for i in seen},
               # among the sources drawn in the interval: concepts their encoder never fired
               "dead_fraction": {names[i]: (fires[i] == 0).double().mean().item() for i in seen},
               "dead_fraction_all": (fires.sum(dim=0) == 0).double().mean().item()
               if len(seen) == len(names) else None,
               "dictionary_cosine_to_init": self.dictionary_cosine_to_init()}
        self._r2_sums.zero_()
        self._source_steps.zero_()
        self._fires.zero_()
        return row

    def draw_source(self) -> str:
        index = torch.randint(len(self.model.names), (1,), generator=self.generator).item()
        return self.model.names[index]

    def _lr(self, name: str) -> float:
        cfg = self.config
        if cfg.schedule == "paper":
            return scheduled_lr(self.step_count, self.total_steps, self.warmup_steps,
                                cfg.lr, cfg.final_lr)
        if self.updates[name] == 0:  # the released optimizer's first step runs at its initial lr
            return cfg.lr
        return scheduled_lr(self.updates[name], self.total_steps, self.warmup_steps,
                            cfg.lr, cfg.final_lr)

    def step(self, batch: Mapping[str, Tensor], source: str | None = None) -> Tensor:
        """One step on a standardised, validated batch; returns the per-target losses (M,)."""
        model, cfg = self.model, self.config
        source = self.draw_source() if source is None else source
        stepped = model.names if cfg.update == "all_decoders" else [source]
        for name in stepped:
            self.optimizers[name].zero_grad(set_to_none=True)

        # The released code also computes the gradients of the decoders it does not step and
        # throws them away; detaching gives the stepped parameters the same gradients.
        dictionaries = {name: model.dictionary(name) if name in stepped
                        else model.dictionary(name).detach() for name in model.names}
        device = next(model.parameters()).device
        autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=cfg.precision == "bf16")
        if cfg.loss == "l1_aux":
            losses = self._l1_aux_losses(batch, source, dictionaries, autocast)
        else:
            with autocast:
                encoding = model.encode_full(source, batch[source], standardized=True)
                values = encoding.codes.gather(-1, encoding.indices)
                recons = {name: F.embedding_bag(encoding.indices, d, per_sample_weights=values,
                                                mode="sum") if cfg.sparse_decode
                          else encoding.codes @ d for name, d in dictionaries.items()}
            recons = {name: recon.float() for name, recon in recons.items()}
            losses = torch.stack([
                self.loss_fn(batch[name], recons[name], encoding.pre_codes,
                             encoding.codes, dictionaries[name]) for name in model.names])
            self._track(source, batch, recons, encoding.indices, values)
        losses.sum().backward()

        for name in stepped:
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.pairs[name].parameters(), cfg.grad_clip)
            optimizer = self.optimizers[name]
            for group in optimizer.param_groups:
                group["lr"] = self._lr(name)
            optimizer.step()
            self.updates[name] += 1
        self.step_count += 1
        return losses.detach()

    def _l1_aux_losses(self, batch: Mapping[str, Tensor], source: str,
                       dictionaries: Mapping[str, Tensor], autocast: torch.autocast) -> Tensor:
        """:func:`l1_aux_loss` into every target, (M,): the same values for less work.

        Rewrites of the M calls that change nothing but float rounding (tests/test_train_speed.py
        checks them against the released loop). The auxiliary codes depend on the source only,
        so they are selected once. Codes plus auxiliary codes are the top k + n // 2 ReLU'd
        pre-codes (the top k, then the top n // 2 of the rest; where fewer are positive both
        pick zeros, which carry no value and no gradient), so the auxiliary residual
        ``residual - aux_codes @ D`` is ``target - wide @ D``: one decode, no leftovers formed.
        Dictionaries are concatenated into one matmul for those that learn and one for frozen
        ones, so no frozen weight gradient is ever formed.
        """
        model, cfg = self.model, self.config
        with autocast:
            pre_codes, activated, values, indices = model._encode(source, batch[source])
        n = pre_codes.shape[1]
        wide = activated
        if model.k + n // 2 < n:
            with torch.no_grad():
                kept = torch.topk(activated, model.k + n // 2, dim=-1, sorted=False).indices
                mask = torch.zeros_like(activated, dtype=torch.bool).scatter_(-1, kept, True)
            wide = torch.where(mask, activated, 0.0)

        learning = [name for name in model.names if dictionaries[name].requires_grad]
        frozen = [name for name in model.names if name not in learning]
        groups = [torch.cat([dictionaries[name] for name in group], dim=1)
                  for group in (learning, frozen) if group]
        with autocast:
            if cfg.sparse_decode:
                recon = torch.cat([F.embedding_bag(indices, d, per_sample_weights=values,
                                                   mode="sum") for d in groups], dim=1)
            else:
                codes = torch.zeros_like(activated).scatter(-1, indices, values)
                recon = torch.cat([codes @ d for d in groups], dim=1)
            wide_recon = torch.cat([wide @ d for d in groups], dim=1)
        recon, wide_recon = recon.float(), wide_recon.float()

        terms, recons, start = {}, {}, 0
        for name in learning + frozen:  # the column order of the decodes
            target, stop = batch[name], start + batch[name].shape[1]
            recons[name] = recon[:, start:stop]
            main = (target - recons[name]).abs().mean()
            aux = (target - wide_recon[:, start:stop]).abs().mean()
            terms[name] = main + cfg.aux_weight * aux
            start = stop
        self._track(source, batch, recons, indices, values)
        return torch.stack([terms[name] for name in model.names])

    # -- state for checkpoints ------------------------------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {"trainer.generator_state": self.generator.get_state()}
        for name, start in self.initial_dictionaries.items():
            tensors[f"trainer.initial_dictionary.{name}"] = start
        for name, optimizer in self.optimizers.items():
            for index, state in optimizer.state_dict()["state"].items():
                for key, value in state.items():
                    tensors[f"optimizer.{name}.{index}.{key}"] = value
        return tensors

    def state_json(self) -> dict:
        groups = {name: [{k: v for k, v in g.items() if k != "params"}
                         for g in opt.state_dict()["param_groups"]]
                  for name, opt in self.optimizers.items()}
        return {"config": dataclasses.asdict(self.config), "seed": self.seed,
                "total_steps": self.total_steps, "step": self.step_count,
                "updates": dict(self.updates), "param_groups": groups,
                "history": self.history}

    def load_state(self, meta: dict, tensors: Mapping[str, Tensor]) -> None:
        self.generator.set_state(tensors["trainer.generator_state"])
        for name, optimizer in self.optimizers.items():
            prefix = f"optimizer.{name}."
            state: dict[int, dict[str, Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith(prefix):
                    index, field = key[len(prefix):].split(".", 1)
                    state.setdefault(int(index), {})[field] = value
            # The hyperparameters come from the checkpoint, how the update is computed
            # (fused, foreach) from this run.
            groups = [dict(saved, betas=tuple(saved["betas"]), params=current["params"],
                           **{key: current[key] for key in _IMPLEMENTATION_KEYS if key in current})
                      for saved, current in zip(meta["param_groups"][name],
                                                optimizer.state_dict()["param_groups"])]
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.updates = dict(meta["updates"])
        self.step_count = meta["step"]
        self.history = list(meta.get("history", []))
        device = next(self.model.parameters()).device
        self.initial_dictionaries = {
            name: tensors[f"trainer.initial_dictionary.{name}"].to(device)
            for name in self.model.names if f"trainer.initial_dictionary.{name}" in tensors}


def _check_batch(model: USAE, batch: Any, step: int) -> None:
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
        model._check_acts(name, batch[name])
        if not torch.isfinite(batch[name]).all():
            raise ValueError(f"batch {step} holds NaN or inf activations for model {name!r}; "
                             "rebuild or clean the activation cache.")


def _batch_stream(batches: Iterable, start: int) -> Iterator:
    """Batches from global index ``start``: re-iterates a re-iterable source for new epochs."""
    if hasattr(batches, "iter_from"):  # a loader that can seek without reading skipped data
        yield from batches.iter_from(start)
        return
    seen = 0
    while True:
        iterator, produced = iter(batches), False
        for batch in iterator:
            produced = True
            if seen >= start:
                yield batch
            seen += 1
        if iterator is batches or not produced:
            return


def train(model: USAE, batches: Iterable[Mapping[str, Tensor]], steps: int, seed: int = 0,
          **options: Any) -> TrainResult:
    """Train ``model`` for ``steps`` steps (paper Fig. 3 with the released code's details).

    Parameters
    ----------
    model : USAE
        Its standardisation is fitted on the first batch unless already set.
    batches : iterable of dict
        Each batch maps every model name to a tensor (tokens x width) of *raw* activations,
        row t of every tensor being the same image and position. A re-iterable source (a list,
        a loader) is iterated again for each epoch; an object with ``iter_from(step)`` is asked
        for the stream from ``step`` when a run resumes.
    steps : int
        Total optimisation steps of the run (a resumed run counts the ones already done).
    seed : int
        Seeds the drawing of source models.
    **options
        Fields of :class:`TrainConfig`.

    Returns
    -------
    TrainResult
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown training options {sorted(unknown)}; valid ones are "
                        f"{[f.name for f in dataclasses.fields(TrainConfig)]}.")
    _positive_int(steps, "steps")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    config = TrainConfig(**options)
    config.validate()
    if config.device is not None:
        model.to(config.device)
    trainer = Trainer(model, config, steps, seed)
    path = Path(config.checkpoint_path) if config.checkpoint_path else None
    if path is not None:  # a write killed mid-way leaves its temporary file: remove it
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
    if path is not None and config.resume and path.exists():
        _resume(trainer, path)
    model.train()
    device = next(model.parameters()).device
    history = trainer.history
    sums = torch.zeros(len(model.names), device=device)
    sources = dict.fromkeys(model.names, 0)
    since_log = 0

    def log() -> None:
        nonlocal since_log
        values = (sums / since_log).tolist()
        history.append({"step": trainer.step_count, "loss": sum(values),
                        "loss_by_target": dict(zip(model.names, values)),
                        "steps_by_source": dict(sources),
                        "lr": {name: trainer._lr(name) for name in model.names},
                        **trainer.read_interval()})
        sums.zero_()
        sources.update(dict.fromkeys(sources, 0))
        since_log = 0

    fitted = bool(model.standardization_fitted)  # read once: on a GPU each read is a sync
    stream = _batch_stream(batches, trainer.step_count)
    bar = tqdm(total=steps, initial=trainer.step_count, disable=not config.progress,
               desc="USAE", unit="step")
    try:
        while trainer.step_count < steps:
            batch = next(stream, None)
            if batch is None:
                raise ValueError(f"batches ran out after step {trainer.step_count} of {steps}: "
                                 "pass a re-iterable source (a list or a loader) or one that "
                                 "yields at least `steps` batches.")
            _check_batch(model, batch, trainer.step_count)
            if not fitted:
                model.fit_standardization(batch)
                fitted = True
            batch = {n: model.standardize(n, t.to(device, torch.float32, non_blocking=True))
                     for n, t in batch.items()}
            if trainer.step_count == 0:
                trainer.initialise(batch)
            source = trainer.draw_source()
            sums += trainer.step(batch, source)
            sources[source] += 1
            since_log += 1
            bar.update(1)
            if trainer.step_count % config.log_every == 0 or trainer.step_count == steps:
                log()
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if path is not None and config.checkpoint_every and \
                    trainer.step_count % config.checkpoint_every == 0:
                _write_checkpoint(model, path, trainer)
    except (ValueError, TypeError):
        # A bad batch is caught before it changes anything: keep the work done so far.
        if path is not None and trainer.step_count > 0:
            _write_checkpoint(model, path, trainer)
        raise
    finally:
        bar.close()
    if path is not None:
        _write_checkpoint(model, path, trainer)
    model.eval()
    return TrainResult(model, history, trainer.step_count)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file, the JSON configuration in its header. No pickle anywhere.


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match what it is used with."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}; choose a writable "
                      "folder with free space.") from error
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, CheckpointError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror}; choose a "
                          "writable folder with free space.") from error
        raise


def _header(model: USAE) -> dict:
    return {"format": CHECKPOINT_FORMAT, "library_version": __version__,
            "torch_version": torch.__version__, "model": model.config(),
            "standardization": {n: {"mean": m, "std": s}
                                for n, (m, s) in model.standardization().items()},
            "standardization_fitted": bool(model.standardization_fitted)}


def _checksum(header: Mapping, tensors: Mapping[str, Tensor]) -> str:
    """sha256 of the header (less this checksum) and of every tensor's bytes, in key order."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"},
                                       sort_keys=True).encode())
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _write_checkpoint(model: USAE, path: Path, trainer: Trainer | None = None) -> None:
    header = _header(model)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if trainer is not None:
        header["training"] = trainer.state_json()
        tensors.update({k: v.detach().cpu().contiguous()
                        for k, v in trainer.state_tensors().items()})
    header["sha256"] = _checksum(header, tensors)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"usae": json.dumps(header)}))


def save(model: USAE, path: str | os.PathLike) -> None:
    """Write ``model`` to one safetensors file whose header holds its JSON configuration."""
    _write_checkpoint(model, Path(path))


def read_header(path: str | os.PathLike) -> dict:
    """The JSON configuration stored in a checkpoint (model, standardisation, training)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}.")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        header = json.loads(metadata["usae"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable USAE checkpoint ({error}); it may be "
                              "truncated or from another program: train again or restore "
                              "it from a copy.") from error
    if header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has format {header.get('format')!r}, this library reads "
                              f"{CHECKPOINT_FORMAT!r}.")
    return header


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, Tensor]]:
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


def _load_model_state(model: USAE, header: dict, tensors: Mapping[str, Tensor], path: Path) -> None:
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


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> USAE:
    """Read a model written by :func:`save` or by training; returns it in eval mode."""
    path = Path(path)
    header, tensors = _read_checkpoint(path)
    config = header["model"]
    model = USAE(config["dims"], config["n_concepts"], config["k"])
    _load_model_state(model, header, tensors, path)
    return model.to(device).eval()


def _resume(trainer: Trainer, path: Path) -> None:
    header, tensors = _read_checkpoint(path)
    model, config = trainer.model, trainer.config
    if header["model"] != model.config():
        raise CheckpointError(f"the checkpoint {path} holds a USAE {header['model']}, but the "
                              f"model being trained is {model.config()}: pass another "
                              "checkpoint_path, or continue the saved one with "
                              "usae_core.load(path).")
    training = header.get("training")
    if training is None:
        raise CheckpointError(f"{path} holds a saved model but no training state; pass another "
                              "checkpoint_path to start a new run.")
    saved = training["config"]
    defaults = TrainConfig()  # for fields added after the checkpoint was written
    saved = {key: saved.get(key, getattr(defaults, key)) for key in TrainConfig.MATH_FIELDS}
    differ = {key: (saved[key], getattr(config, key)) for key in TrainConfig.MATH_FIELDS
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
    trainer.load_state(training, tensors)
    if trainer.step_count > trainer.total_steps:
        raise CheckpointError(f"{path} is at step {trainer.step_count}, past steps="
                              f"{trainer.total_steps}.")
