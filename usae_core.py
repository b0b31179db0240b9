"""Universal Sparse Autoencoders (Thasarathan et al., ICML 2025): model, losses, training loop.

A USAE learns one sparse concept space shared by M models. Model ``i`` has an encoder
(Linear -> BatchNorm -> ReLU -> per-token TopK) into ``n`` shared concepts and a dictionary
``D_i`` (n x d_i, unit-norm rows) out of them, so the codes of any model reconstruct the
activations of every model. Each training step draws one source model, encodes its tokens and
decodes them into all M models (paper Fig. 3). Losses live in each model's standardised space
(one scalar mean and std per model, as released). Defaults follow the released code, except
the learning-rate schedule (the paper's); see the README. Checkpoints and resumable training are
in ``usae_checkpoint``, one level up: this module imports nothing of the project.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__version__ = "0.2.0"
STD_EPS = 1e-5  # (x - mean) / (std + 1e-5), as the released code
DICTIONARY_EPS = 1e-8
FIRING_THRESHOLD = 0.1  # a concept fires on a token when its code exceeds this (released tau)


class Encoding(NamedTuple):
    """What an encoder computes for a batch of tokens.

    Attributes
    ----------
    pre_codes : Tensor
        BatchNorm output before the ReLU, ``tokens x n``: the auxiliary loss and activation
        maximisation need it, since TopK gives no gradient to a concept outside the top k.
    codes : Tensor
        Dense codes ``tokens x n``: ReLU then TopK, every entry >= 0, at most k per token > 0.
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
        # reparameterisation, as released), so every concept vector has unit norm.
        self.raw_dictionary = nn.Parameter(torch.randn(n_concepts, width))
        self.register_buffer("act_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("act_std", torch.ones((), dtype=torch.float64))
        # Per-channel mean minus act_mean: zero under the released scalar standardisation; with
        # channel centring it plays the role of the paper's b_pre (Eq. 1), fixed to the data mean.
        self.register_buffer("channel_offset", torch.zeros(width))

    def dictionary(self) -> Tensor:
        return self.raw_dictionary / (self.raw_dictionary.norm(dim=1, keepdim=True)
                                      + DICTIONARY_EPS)


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


class USAE(nn.Module):
    """A universal sparse autoencoder over several models.

    Parameters
    ----------
    dims : mapping of str to int
        Model name -> activation width ``d``; names must be identifiers. One model gives an
        ordinary TopK SAE.
    n_concepts : int
        Width ``n`` of the shared code (paper: 6144 = 8 x 768).
    k : int
        Concepts kept per token, ``1 <= k < n`` (released: 32).
    seed : int, optional
        Seeds the initialisation; ``None`` uses torch's global generator.
    """

    def __init__(self, dims: Mapping[str, int], n_concepts: int, k: int, *, seed: int | None = None):
        super().__init__()
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
        if seed is not None:
            require_seed(seed)
        if k >= n_concepts:
            raise ValueError(f"k={k} must be smaller than n_concepts={n_concepts}: TopK keeps k "
                             "of the n concepts per token (the paper uses k=32 of n=6144).")
        self.dims, self.n_concepts, self.k = dict(dims), n_concepts, k
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

    def check_acts(self, name: str, acts: Tensor) -> None:
        """Refuse activations that are not ``tokens x width`` of a known model, or not finite."""
        if name not in self.dims:
            raise KeyError(f"unknown model {name!r}; this USAE knows {self.names}.")
        if acts.ndim != 2 or acts.shape[1] != self.dims[name]:
            raise ValueError(f"model {name!r} takes activations of shape (tokens, "
                             f"{self.dims[name]}), got {tuple(acts.shape)}: flatten images x "
                             "positions into tokens and check the model name.")
        if not torch.isfinite(acts).all():
            raise ValueError(f"NaN or inf activations for model {name!r}: rebuild or clean "
                             "the activation cache.")

    # -- standardisation ------------------------------------------------------------------------

    def standardization(self) -> dict[str, tuple[float, float]]:
        """Model name -> (mean, std) scalars applied on the way in and out."""
        return {n: (p.act_mean.item(), p.act_std.item()) for n, p in self.pairs.items()}

    def set_standardization(self, stats: Mapping[str, tuple[float, float]],
                            channel_means: Mapping[str, Tensor] | None = None) -> None:
        """Set every model's scalar mean and std (e.g. from an activation cache).

        With ``channel_means`` (model name -> per-channel mean of the raw activations) every
        channel is also centred on its own mean, so no concept is spent on the mean activation
        (a CNN's final map has a large, channel-dependent one). The scale stays the scalar std.
        """
        for name, width in self.dims.items():
            mean, std = (float(v) for v in stats[name])
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(f"standardisation of {name!r} needs a finite mean and a "
                                 f"positive std, got mean={mean}, std={std}.")
            means = None if channel_means is None else \
                torch.as_tensor(channel_means[name], dtype=torch.float64).flatten()
            if means is not None and (means.shape != (width,) or not torch.isfinite(means).all()):
                raise ValueError(f"channel means of {name!r} must be {width} finite values, "
                                 f"got shape {tuple(means.shape)}.")
        for name, pair in self.pairs.items():
            mean, std = stats[name]
            pair.act_mean.fill_(float(mean))
            pair.act_std.fill_(float(std))
            pair.channel_offset.zero_()
            if channel_means is not None:
                pair.channel_offset.copy_(torch.as_tensor(channel_means[name]).flatten() - mean)
        self.standardization_fitted.fill_(True)

    def fit_standardization(self, sample: Mapping[str, Tensor], *,
                            centre_channels: bool = False) -> dict[str, tuple[float, float]]:
        """Fit one scalar mean and (unbiased) std per model over every entry of ``sample``."""
        values = {name: sample[name].detach().to(torch.float64) for name in self.dims}
        stats = {name: (v.mean().item(), v.std().item()) for name, v in values.items()}
        means = {name: v.mean(dim=0) for name, v in values.items()} if centre_channels else None
        self.set_standardization(stats, means)
        return stats

    def standardize(self, name: str, acts: Tensor) -> Tensor:
        pair = self.pairs[name]
        return (acts - pair.act_mean.float() - pair.channel_offset) / (pair.act_std.float()
                                                                        + STD_EPS)

    def unstandardize(self, name: str, acts: Tensor) -> Tensor:
        pair = self.pairs[name]
        return acts * (pair.act_std.float() + STD_EPS) + pair.act_mean.float() + pair.channel_offset

    def scalar_frame_offset(self, name: str) -> Tensor:
        """``standardize(a) + offset == (a - mean) / (std + eps)``, the released frame.

        Zero unless channels are centred; metrics the paper reports in its frame (the
        global-mean R^2) add it to both the target and the reconstruction.
        """
        pair = self.pairs[name]
        return pair.channel_offset / (pair.act_std.float() + STD_EPS)

    # -- encode / decode ------------------------------------------------------------------------

    def encode_full(self, name: str, acts: Tensor, *, standardized: bool = False) -> Encoding:
        """Encode ``acts`` (tokens x d) of model ``name``; see :class:`Encoding`."""
        # Checked before BatchNorm sees them: in train mode NaNs would enter its running stats.
        self.check_acts(name, acts)
        return self._encode(name, acts if standardized else self.standardize(name, acts))

    def _encode(self, name: str, x: Tensor) -> Encoding:
        pair = self.pairs[name]
        # Under bf16 autocast only the matmul runs in bf16; BatchNorm gets the input's dtype.
        pre_codes = pair.batch_norm(pair.linear(x).to(x.dtype))
        values, indices = torch.topk(F.relu(pre_codes), self.k, dim=-1, sorted=False)
        return Encoding(pre_codes, torch.zeros_like(pre_codes).scatter(-1, indices, values),
                        indices)

    def encode(self, name: str, acts: Tensor, *, standardized: bool = False) -> Tensor:
        """Dense codes (tokens x n, >= 0, k selected per token) of model ``name``'s tokens."""
        return self.encode_full(name, acts, standardized=standardized).codes

    def dictionary(self, name: str) -> Tensor:
        """Model ``name``'s dictionary: n x d, every row of unit L2 norm."""
        if name not in self.dims:
            raise KeyError(f"unknown model {name!r}; this USAE knows {self.names}.")
        return self.pairs[name].dictionary()

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
# Losses: pure functions of one signature. Each takes one step's targets and reconstructions
# (model name -> tokens x d), the source's Encoding and the dictionaries, and returns one loss
# per target (M,), in the order of ``targets``.


def l1_aux_loss(targets: Mapping[str, Tensor], recons: Mapping[str, Tensor], encoding: Encoding,
                dictionaries: Mapping[str, Tensor], aux_weight: float = 0.1) -> Tensor:
    """The released criterion: element-mean L1 plus ``aux_weight`` x an auxiliary L1 term.

    Released form, per target: the top n // 2 of the *non-selected* ReLU'd pre-codes decode
    the residual, ``|(target - recon) - aux_codes @ D|``, which keeps unselected concepts
    learning (the residual is not detached). Codes plus auxiliary codes are the top
    ``k + n // 2`` ReLU'd pre-codes, so the auxiliary term is ``|target - wide @ D|``: one
    selection for all targets (tests/test_train_speed.py checks it against the released form).
    """
    activated = F.relu(encoding.pre_codes)
    n, k = activated.shape[1], encoding.indices.shape[1]
    wide = activated
    if k + n // 2 < n:
        with torch.no_grad():
            kept = torch.topk(activated, k + n // 2, dim=-1, sorted=False).indices
        wide = torch.zeros_like(activated).scatter(-1, kept, activated.gather(-1, kept))
    return torch.stack([
        (target - recons[name]).abs().mean()
        + aux_weight * (target - (wide @ dictionaries[name]).float()).abs().mean()
        for name, target in targets.items()])


def frobenius_loss(targets, recons, encoding, dictionaries) -> Tensor:
    """The paper text's loss (Eq. 5, Fig. 3): the Frobenius norm of the residual, not squared."""
    return torch.stack([torch.linalg.matrix_norm(t - recons[n]) for n, t in targets.items()])


def mse_loss(targets, recons, encoding, dictionaries) -> Tensor:
    """Element-mean squared error."""
    return torch.stack([(t - recons[n]).square().mean() for n, t in targets.items()])


LOSSES: dict[str, Callable[..., Tensor]] = {
    "l1_aux": l1_aux_loss, "frobenius": frobenius_loss, "mse": mse_loss}
CHOICES = {"loss": tuple(LOSSES), "update": ("released", "all_decoders"),
           "schedule": ("paper", "released"), "precision": ("fp32", "bf16"),
           "dictionary_init": ("randn", "unit", "tokens"), "encoder_init": ("default", "transpose")}


@dataclass
class TrainConfig:
    """Every option of :func:`train`; saved with each checkpoint. Defaults: the released code.

    Attributes
    ----------
    loss : {"l1_aux", "frobenius", "mse"}
        ``l1_aux``: the released criterion; ``frobenius``: the paper text's.
    aux_weight : float
        Weight of the auxiliary term of ``l1_aux`` (released: 0.1).
    update : {"released", "all_decoders"}
        ``released``: a step with source i changes only encoder i and decoder i.
        ``all_decoders``: every decoder also learns from its reconstruction at every step.
    schedule : {"paper", "released"}
        ``paper``: linear warm-up, then cosine decay to ``final_lr`` over the run, on the global
        step. ``released``: each model's schedule advances only when its optimizer steps (the
        run ends near 2.3e-4, not 1e-6).
    lr, final_lr, weight_decay : float
        Per-model AdamW (released: 3e-4, 1e-6, 1e-5).
    warmup_steps : int or None
        Linear warm-up length; ``None``: ``steps // 30`` (released: 1 of 30 epochs).
    grad_clip : float
        Global-norm gradient clip per model; 0 disables.
    log_every : int
        Steps between history rows (the only host synchronisations of the loop).
    device : str or None
        Where to train; ``None`` keeps the model where it is.
    progress : bool
        Show a progress bar.
    precision : {"fp32", "bf16"}
        ``bf16`` runs the encoder and decoder matmuls under bf16 autocast (BatchNorm, TopK and
        losses stay fp32): faster where bf16 matmuls are, but not only a rounding change.
    sparse_decode : bool
        Decode each token's k concepts as a weighted sum of k dictionary rows
        (``F.embedding_bag``) instead of ``codes @ D``: the same values up to rounding, n / k
        times fewer FLOPs, but a memory-bound gather (``benchmarks/train_throughput.py``).
    dictionary_init : {"randn", "unit", "tokens"}
        ``randn``: raw rows ``torch.randn`` (norm about sqrt(d)), as released; Adam moves each
        entry by about ``lr`` per step, so a short run barely turns them. ``unit``: the same
        directions at unit norm (they turn sqrt(d) times faster). ``tokens``: row c of every
        dictionary is that model's standardised token at one shared random row of the first batch.
    encoder_init : {"default", "transpose"}
        ``default``: PyTorch's Linear init, as released. ``transpose``: the dictionary's
        transpose, zero bias (Gao et al., 2024).
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
    device: str | None = None
    progress: bool = True
    precision: str = "fp32"
    sparse_decode: bool = False
    dictionary_init: str = "randn"
    encoder_init: str = "default"

    # Options that change what a run computes: a resumed run must agree on all of them
    # (sparse_decode changes only the float rounding, as the device does).
    MATH_FIELDS = ("loss", "aux_weight", "update", "schedule", "lr", "final_lr", "weight_decay",
                   "warmup_steps", "grad_clip", "precision", "dictionary_init", "encoder_init")

    def validate(self) -> None:
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {sorted(allowed)}.")
        for key in ("aux_weight", "lr", "final_lr", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            bound = "> 0" if key == "lr" else ">= 0"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
                raise ValueError(f"{key} must be a finite number {bound}, got {value!r}.")
        if self.warmup_steps is not None and not is_int(self.warmup_steps):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}.")
        for key in ("progress", "sparse_decode"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}.")
        require_positive_int(self.log_every, "log_every")
        if self.device is not None:
            require_device(self.device)


def scheduled_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                 final_lr: float) -> float:
    """Linear warm-up from ``final_lr`` to ``base_lr``, then cosine decay back to ``final_lr``."""
    if step < warmup_steps:
        return final_lr + (base_lr - final_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Training


class TrainResult(NamedTuple):
    """What :func:`train` returns: the trained model and one history row per log interval."""

    model: USAE
    history: list[dict]
    step: int


class Trainer:
    """Per-model AdamW optimizers, the schedule and the source-drawing generator of one run.

    :func:`train` drives it; it exists on its own so that single steps can be driven and
    inspected (tests, benchmarks) and saved (``usae_checkpoint``).
    """

    def __init__(self, model: USAE, config: TrainConfig, total_steps: int, seed: int):
        self.model, self.config, self.total_steps, self.seed = model, config, total_steps, seed
        self.warmup_steps = total_steps // 30 if config.warmup_steps is None else \
            config.warmup_steps
        # One fused kernel per update instead of small ops per parameter (about 4x faster on CPU
        # at the paper's sizes); the same update up to float rounding.
        fused = True if next(model.parameters()).device.type in ("cpu", "cuda") else None
        self.optimizers = {name: torch.optim.AdamW(model.pairs[name].parameters(), lr=config.lr,
                                                   weight_decay=config.weight_decay, fused=fused)
                           for name in model.names}
        self.updates = dict.fromkeys(model.names, 0)  # optimizer steps taken per model
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.history: list[dict] = []  # one row per log interval, kept across resumes
        # How far training moved the dictionaries from here is the first thing to check: a run
        # whose rows still point where they started has learned nothing.
        self.initial_dictionaries: dict[str, Tensor] = {}
        device, m = next(model.parameters()).device, len(model.names)
        self._r2_sums = torch.zeros(m, m, device=device)  # source x target, this interval
        self._source_steps = torch.zeros(m, device=device)
        self._fires = torch.zeros(m, model.n_concepts, dtype=torch.long, device=device)

    @torch.no_grad()
    def initialise(self, batch: Mapping[str, Tensor]) -> None:
        """Apply ``dictionary_init`` and ``encoder_init`` with the first standardised batch."""
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
        self.initial_dictionaries = {n: model.dictionary(n).detach().clone() for n in model.names}

    def dictionary_cosine_to_init(self) -> dict[str, float | None]:
        """Per model, the median over concepts of the cosine between each dictionary row now and
        right after initialisation (1: nothing moved); ``None`` when the start is unknown."""
        return {name: None if name not in self.initial_dictionaries else
                (self.model.dictionary(name).detach() * self.initial_dictionaries[name])
                .sum(dim=1).median().item() for name in self.model.names}

    @torch.no_grad()
    def _track(self, source: str, targets: Mapping[str, Tensor], recons: Mapping[str, Tensor],
               encoding: Encoding) -> None:
        """Accumulate this step's training-batch R^2 (released form, scalar frame) and firings
        on the device; :meth:`read_interval` turns them into a history row."""
        row = self.model.names.index(source)
        for column, name in enumerate(self.model.names):
            error = (targets[name] - recons[name]).square().mean()
            variance = (targets[name] + self.model.scalar_frame_offset(name)).var(unbiased=False)
            self._r2_sums[row, column] += 1 - error / (variance + 1e-6)
        self._source_steps[row] += 1
        fired = encoding.indices[encoding.codes.gather(-1, encoding.indices) > FIRING_THRESHOLD]
        self._fires[row] += torch.bincount(fired, minlength=self.model.n_concepts)

    def read_interval(self) -> dict:
        """R^2 matrix, dead fractions and dictionary movement since the last call; resets."""
        names, steps, r2 = self.model.names, self._source_steps.tolist(), self._r2_sums.tolist()
        fires = self._fires.cpu()
        seen = [i for i, count in enumerate(steps) if count > 0]
        row = {"r2": {names[i]: {t: r2[i][j] / steps[i] for j, t in enumerate(names)}
                      for i in seen},
               # among the sources drawn in the interval: concepts their encoder never fired
               "dead_fraction": {names[i]: (fires[i] == 0).double().mean().item() for i in seen},
               "dead_fraction_all": (fires.sum(dim=0) == 0).double().mean().item()
               if len(seen) == len(names) else None,
               "dictionary_cosine_to_init": self.dictionary_cosine_to_init()}
        for accumulator in (self._r2_sums, self._source_steps, self._fires):
            accumulator.zero_()
        return row

    def draw_source(self) -> str:
        return self.model.names[torch.randint(len(self.model.names), (1,),
                                              generator=self.generator).item()]

    def lr(self, name: str) -> float:
        cfg = self.config
        if cfg.schedule == "paper":
            step = self.step_count
        elif self.updates[name] == 0:  # the released optimizer's first step uses its initial lr
            return cfg.lr
        else:
            step = self.updates[name]
        return scheduled_lr(step, self.total_steps, self.warmup_steps, cfg.lr, cfg.final_lr)

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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            encoding = model._encode(source, batch[source])
            values = encoding.codes.gather(-1, encoding.indices)
            recons = {name: (F.embedding_bag(encoding.indices, d, per_sample_weights=values,
                                             mode="sum") if cfg.sparse_decode
                             else encoding.codes @ d).float() for name, d in dictionaries.items()}
            options = {"aux_weight": cfg.aux_weight} if cfg.loss == "l1_aux" else {}
            losses = LOSSES[cfg.loss](batch, recons, encoding, dictionaries, **options)
        self._track(source, batch, recons, encoding)
        losses.sum().backward()
        for name in stepped:
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.pairs[name].parameters(), cfg.grad_clip)
            for group in self.optimizers[name].param_groups:
                group["lr"] = self.lr(name)
            self.optimizers[name].step()
            self.updates[name] += 1
        self.step_count += 1
        return losses.detach()


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
        try:
            model.check_acts(name, batch[name])
        except ValueError as error:
            raise ValueError(f"batch {step}: {error}") from None


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


def make_trainer(model: USAE, steps: int, seed: int = 0, **options: Any) -> Trainer:
    """Validate :func:`train`'s arguments and build its :class:`Trainer` (on ``device``)."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    if set(options) - set(fields):
        raise TypeError(f"unknown training options {sorted(set(options) - set(fields))}; valid "
                        f"ones are {fields}.")
    require_positive_int(steps, "steps")
    require_seed(seed)
    config = TrainConfig(**options)
    config.validate()
    if config.device is not None:
        model.to(config.device)
    return Trainer(model, config, steps, seed)


def train(model: USAE, batches: Iterable[Mapping[str, Tensor]], steps: int, seed: int = 0, *,
          trainer: Trainer | None = None, on_step: Callable[[Trainer], None] | None = None,
          **options: Any) -> TrainResult:
    """Train ``model`` for ``steps`` steps (paper Fig. 3 with the released code's details).

    Parameters
    ----------
    model : USAE
        Its standardisation is fitted on the first batch unless already set.
    batches : iterable of dict
        Model name -> *raw* activations (tokens x width), row t of every tensor the same image
        and position. Re-iterable sources are iterated again for each epoch; one with
        ``iter_from(step)`` is asked for the stream from ``step`` when a run resumes.
    steps, seed : int
        Total optimisation steps (resumed ones included); seed of the draw of source models.
    trainer, on_step
        For ``usae_checkpoint``: a :class:`Trainer` to continue (replacing ``steps``, ``seed``
        and the options) and a function called after every step.
    **options
        Fields of :class:`TrainConfig`.
    """
    trainer = trainer or make_trainer(model, steps, seed, **options)
    config, steps, names = trainer.config, trainer.total_steps, model.names
    model.train()
    device = next(model.parameters()).device
    sums, since_log = torch.zeros(len(names), device=device), 0
    sources = dict.fromkeys(names, 0)
    fitted = bool(model.standardization_fitted)  # read once: on a GPU each read is a sync
    stream = _batch_stream(batches, trainer.step_count)
    bar = tqdm(total=steps, initial=trainer.step_count, disable=not config.progress,
               desc="USAE", unit="step")
    with bar:
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
                values = (sums / since_log).tolist()
                trainer.history.append({
                    "step": trainer.step_count, "loss": sum(values),
                    "loss_by_target": dict(zip(names, values)), "steps_by_source": dict(sources),
                    "lr": {name: trainer.lr(name) for name in names}, **trainer.read_interval()})
                bar.set_postfix(loss=f"{values and sum(values):.4f}")
                sums.zero_()
                sources, since_log = dict.fromkeys(names, 0), 0
            if on_step is not None:
                on_step(trainer)
    model.eval()
    return TrainResult(model, trainer.history, trainer.step_count)
