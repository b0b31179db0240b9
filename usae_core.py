"""Universal Sparse Autoencoders (Thasarathan et al., ICML 2025): model, losses, training loop.

Model ``i`` has an encoder (Linear -> BatchNorm -> ReLU -> per-token TopK) into ``n`` shared
concepts and a dictionary ``D_i`` (n x d_i, unit-norm rows) out of them. Each training step draws
one source model, encodes its tokens and decodes them into all M models (paper Fig. 3). Defaults
follow the released code, except the schedule (the paper's). This module imports nothing of the
project; ``usae_checkpoint`` (resumable training) and ``usae_monitor`` (diagnostics) build on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__version__ = "0.2.0"
STD_EPS = 1e-5  # (x - mean) / (std + 1e-5), as the released code
FIRING_THRESHOLD = 0.1  # a concept fires on a token when its code exceeds this (released tau)


class Encoding(NamedTuple):
    """``pre_codes``: BatchNorm output before the ReLU (tokens x n; the auxiliary loss and
    activation maximisation need it: TopK gives no gradient outside the top k). ``codes``: ReLU
    then TopK (tokens x n, >= 0). ``indices``: the k selected concepts per token, unordered."""

    pre_codes: Tensor
    codes: Tensor
    indices: Tensor


class ModelPair(nn.Module):
    """Encoder and dictionary of one model, plus its standardisation statistics."""

    def __init__(self, width: int, n_concepts: int):
        super().__init__()
        self.linear = nn.Linear(width, n_concepts)
        self.batch_norm = nn.BatchNorm1d(n_concepts)
        # The dictionary is the row-normalised form of these raw weights, recomputed at every
        # use (a reparameterisation, as released), so every concept vector has unit norm.
        self.raw_dictionary = nn.Parameter(torch.randn(n_concepts, width))
        self.register_buffer("act_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("act_std", torch.ones((), dtype=torch.float64))
        # Per-channel mean minus act_mean: zero under the released scalar standardisation; with
        # channel centring it plays the role of the paper's b_pre (Eq. 1), fixed to the data mean.
        self.register_buffer("channel_offset", torch.zeros(width))

    def dictionary(self) -> Tensor:
        return self.raw_dictionary / (self.raw_dictionary.norm(dim=1, keepdim=True) + 1e-8)


class USAE(nn.Module):
    """A USAE over the models of ``dims`` (name -> width ``d``), with ``n_concepts`` shared
    concepts (paper: 6144) and ``k`` kept per token (released: 32). One model: a TopK SAE.
    Activations are standardised on the way in and out by one scalar mean and std per model."""

    def __init__(self, dims: Mapping[str, int], n_concepts: int, k: int, *, seed: int | None = None):
        super().__init__()
        # Checked where settings enter (Experiment, checkpoints); here they are invariants.
        assert dims and all(isinstance(n, str) and n.isidentifier() and w > 0
                            for n, w in dims.items()), f"dims must map names to widths: {dims!r}"
        assert 0 < k < n_concepts, f"need 0 < k < n_concepts, got k={k}, n_concepts={n_concepts}"
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
        return {"dims": dict(self.dims), "n_concepts": self.n_concepts, "k": self.k}

    def check_acts(self, name: str, acts: Tensor) -> None:
        """Refuse activations that are not ``tokens x width`` of a known model, or not finite."""
        if name not in self.dims:
            raise KeyError(f"unknown model {name!r}; this USAE knows {self.names}.")
        if acts.ndim != 2 or acts.shape[1] != self.dims[name]:
            raise ValueError(f"model {name!r} takes activations of shape (tokens, {self.dims[name]})"
                             f", got {tuple(acts.shape)}: flatten images x positions into tokens.")
        # A finite sum proves every entry finite in one cheap pass; the exact test decides
        # only when the sum overflows.
        if not torch.isfinite(acts.sum(dtype=torch.float32)) and not torch.isfinite(acts).all():
            raise ValueError(f"NaN or inf activations for model {name!r}: rebuild or clean "
                             "the activation cache.")

    def standardization(self) -> dict[str, tuple[float, float]]:
        return {n: (p.act_mean.item(), p.act_std.item()) for n, p in self.pairs.items()}

    def set_standardization(self, stats: Mapping[str, tuple[float, float]],
                            channel_means: Mapping[str, Tensor] | None = None) -> None:
        """Set every model's (mean, std); ``channel_means`` (name -> per-channel mean) also centres
        each channel, so that no concept is spent on a CNN's large channel-dependent mean."""
        for name, width in self.dims.items():
            mean, std = (float(v) for v in stats[name])
            means = torch.full((width,), mean, dtype=torch.float64) if channel_means is None \
                else torch.as_tensor(channel_means[name], dtype=torch.float64).flatten()
            assert math.isfinite(mean) and std > 0 and means.shape == (width,) and \
                torch.isfinite(torch.tensor(std)) and torch.isfinite(means).all(), \
                f"{name!r}: a finite mean, std > 0 and {width} finite channel means"
            pair = self.pairs[name]
            pair.act_mean.fill_(mean)
            pair.act_std.fill_(std)
            pair.channel_offset.copy_(means - mean)
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
        pair = self.pairs[name]  # one shift of d values, then two passes over the tokens
        shift = pair.act_mean.float() + pair.channel_offset
        return (acts - shift).div_(pair.act_std.float() + STD_EPS)

    def unstandardize(self, name: str, acts: Tensor) -> Tensor:
        pair = self.pairs[name]
        return acts * (pair.act_std.float() + STD_EPS) + pair.act_mean.float() + pair.channel_offset

    def scalar_frame_offset(self, name: str) -> Tensor:
        """``standardize(a) + offset`` is the released frame ``(a - mean) / (std + eps)``."""
        pair = self.pairs[name]
        return pair.channel_offset / (pair.act_std.float() + STD_EPS)

    def encode_full(self, name: str, acts: Tensor, *, standardized: bool = False) -> Encoding:
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
        return self.pairs[name].dictionary()

    def decode(self, name: str, codes: Tensor, *, standardized: bool = False) -> Tensor:
        """Reconstruct model ``name``'s activations from codes (tokens x n) of any model."""
        assert codes.shape[-1] == self.n_concepts, f"codes must be (tokens, {self.n_concepts})"
        recon = codes @ self.dictionary(name)
        return recon if standardized else self.unstandardize(name, recon)

    def forward(self, source: str, acts: Tensor) -> dict[str, Tensor]:
        codes = self.encode(source, acts)
        return {name: self.decode(name, codes) for name in self.dims}


# Losses: pure functions of one step's standardised targets and reconstructions (name -> tokens
# x d), the source's Encoding and the dictionaries; one loss per target (M,), in targets' order.

def l1_aux_loss(targets: Mapping[str, Tensor], recons: Mapping[str, Tensor], encoding: Encoding,
                dictionaries: Mapping[str, Tensor], aux_weight: float = 0.1) -> Tensor:
    """The released criterion: element-mean L1 plus ``aux_weight`` x an auxiliary L1 term.

    Released, the top n // 2 *non-selected* ReLU'd pre-codes decode the residual, ``|(target -
    recon) - aux @ D|``, so that unselected concepts keep learning. As codes + aux are the top
    k + n // 2, that is ``|target - wide @ D|``: one selection for all targets (tested).
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
    return torch.stack([(t - recons[n]).square().mean() for n, t in targets.items()])


LOSSES: dict[str, Callable[..., Tensor]] = {
    "l1_aux": l1_aux_loss, "frobenius": frobenius_loss, "mse": mse_loss}
CHOICES = {"loss": tuple(LOSSES), "update": ("released", "all_decoders"),
           "schedule": ("paper", "released"), "precision": ("fp32", "bf16"),
           "dictionary_init": ("randn", "unit", "tokens"), "encoder_init": ("default", "transpose")}


@dataclass
class TrainConfig:
    """Every option of :func:`train`, saved with each checkpoint; defaults: the released code."""

    loss: str = "l1_aux"  # the released criterion; "frobenius": the paper text's; "mse"
    aux_weight: float = 0.1  # of l1_aux's auxiliary term
    update: str = "released"  # source i steps encoder i, decoder i; "all_decoders": every decoder
    schedule: str = "paper"  # warm-up + cosine on the global step; "released": per optimizer step
    lr: float = 3e-4  # per-model AdamW
    final_lr: float = 1e-6
    weight_decay: float = 1e-5
    warmup_steps: int | None = None  # None: steps // 30 (released: 1 of 30 epochs)
    grad_clip: float = 1.0  # global norm per model; 0: none
    log_every: int = 100  # steps between history rows, the only host synchronisations
    device: str | None = None  # None: where the model is
    progress: bool = True
    precision: str = "fp32"  # "bf16": matmuls under bf16 autocast, not only a rounding change
    # Decode k rows per token (embedding_bag), not codes @ D: the same values up to rounding.
    sparse_decode: bool | None = None  # None: on a CPU (faster there), not on a GPU
    dictionary_init: str = "randn"  # released (norm ~sqrt(d): barely turns); "unit", "tokens"
    encoder_init: str = "default"  # PyTorch's; "transpose": the dictionary's (Gao et al., 2024)

    # What a resumed run must agree on: sparse_decode changes only the rounding, as the device does.
    MATH_FIELDS = ("loss", "aux_weight", "update", "schedule", "lr", "final_lr", "weight_decay",
                   "warmup_steps", "grad_clip", "precision", "dictionary_init", "encoder_init")


def scheduled_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                 final_lr: float) -> float:
    """Linear warm-up from ``final_lr`` to ``base_lr``, then cosine decay back to ``final_lr``."""
    if step < warmup_steps:
        return final_lr + (base_lr - final_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


class StepOutput(NamedTuple):  # what on_step sees of each step
    source: str
    targets: Mapping[str, Tensor]
    recons: dict[str, Tensor]
    encoding: Encoding
    losses: Tensor


class TrainResult(NamedTuple):
    model: USAE
    history: list[dict]  # one row per log interval
    step: int


class Trainer:
    """Per-model AdamW optimizers, the schedule and the draw of source models of one run."""

    def __init__(self, model: USAE, config: TrainConfig, total_steps: int, seed: int):
        self.model, self.config, self.total_steps, self.seed = model, config, total_steps, seed
        model.to(config.device or next(model.parameters()).device)
        self.warmup_steps = config.warmup_steps if config.warmup_steps is not None \
            else total_steps // 30
        # One fused kernel per update instead of small ops per parameter (about 4x faster on CPU
        # at the paper's sizes); the same update up to float rounding.
        device = next(model.parameters()).device
        fused = True if device.type in ("cpu", "cuda") else None
        self.sparse_decode = device.type == "cpu" if config.sparse_decode is None \
            else config.sparse_decode
        self.optimizers = {name: torch.optim.AdamW(model.pairs[name].parameters(), lr=config.lr,
                                                   weight_decay=config.weight_decay, fused=fused)
                           for name in model.names}
        self.updates = dict.fromkeys(model.names, 0)  # optimizer steps taken per model
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.history: list[dict] = []
        self.initial_dictionaries: dict[str, Tensor] = {}  # how far did training move them?

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
            if cfg.dictionary_init != "randn":
                chosen = batch[name][rows.to(raw.device)] if cfg.dictionary_init == "tokens" \
                    else raw
                raw.copy_(chosen / (chosen.norm(dim=1, keepdim=True) + 1e-8))
            if cfg.encoder_init == "transpose":
                pair.linear.weight.copy_(pair.dictionary())
                pair.linear.bias.zero_()
        self.initial_dictionaries = {n: model.dictionary(n).detach().clone() for n in model.names}

    def draw_source(self) -> str:
        return self.model.names[torch.randint(len(self.model.names), (1,),
                                              generator=self.generator).item()]

    def lr(self, name: str) -> float:
        cfg = self.config
        if cfg.schedule == "released" and self.updates[name] == 0:
            return cfg.lr  # the released optimizer's first step uses its initial lr
        step = self.step_count if cfg.schedule == "paper" else self.updates[name]
        return scheduled_lr(step, self.total_steps, self.warmup_steps, cfg.lr, cfg.final_lr)

    def step(self, batch: Mapping[str, Tensor], source: str | None = None) -> StepOutput:
        """One step on a standardised, validated batch."""
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
                                             mode="sum") if self.sparse_decode
                             else encoding.codes @ d).float() for name, d in dictionaries.items()}
            options = {"aux_weight": cfg.aux_weight} if cfg.loss == "l1_aux" else {}
            losses = LOSSES[cfg.loss](batch, recons, encoding, dictionaries, **options)
        losses.sum().backward()
        for name in stepped:
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.pairs[name].parameters(), cfg.grad_clip)
            for group in self.optimizers[name].param_groups:
                group["lr"] = self.lr(name)
            self.optimizers[name].step()
            self.updates[name] += 1
        self.step_count += 1
        return StepOutput(source, batch, recons, encoding, losses.detach())


def _epochs(batches: Iterable) -> Iterator:
    """The batches, again for every epoch when the source is re-iterable (a list, a loader)."""
    while True:
        iterator, produced = iter(batches), False
        for produced, batch in enumerate(iterator, 1):
            yield batch
        if iterator is batches or not produced:
            return


def train(model: USAE, batches: Iterable[Mapping[str, Tensor]], steps: int, seed: int = 0, *,
          trainer: Trainer | None = None,
          on_step: Callable[[Trainer, StepOutput], None] | None = None,
          **options: Any) -> TrainResult:
    """Train ``model`` for ``steps`` steps (paper Fig. 3 with the released code's details).

    ``batches`` yields dicts model name -> *raw* activations (tokens x width), row t of every
    tensor the same image and position; a re-iterable source is iterated again for each epoch.
    The standardisation is fitted on the first batch unless already set. ``seed`` seeds the
    draw of source models; ``options`` are :class:`TrainConfig` fields. This loop trusts its
    arguments: ``usae_checkpoint.train`` checks them, then drives it with a ``trainer`` to
    continue and ``on_step(trainer, output)``, which writes checkpoints and history rows.
    """
    trainer = trainer or Trainer(model, TrainConfig(**options), steps, seed)
    steps, device = trainer.total_steps, next(model.parameters()).device
    model.train()
    fitted = bool(model.standardization_fitted)  # read once: on a GPU each read is a sync
    stream = _epochs(batches)
    with tqdm(total=steps, initial=trainer.step_count, disable=not trainer.config.progress,
              desc="USAE", unit="step") as bar:
        while trainer.step_count < steps:
            batch = next(stream, None)
            if batch is None:
                raise ValueError(f"batches ran out after step {trainer.step_count} of {steps}: "
                                 "pass a re-iterable source (a list or a loader) or one that "
                                 "yields at least `steps` batches.")
            if not fitted:
                model.fit_standardization(batch)
                fitted = True
            batch = {n: model.standardize(n, t.to(device, torch.float32, non_blocking=True))
                     for n, t in batch.items()}
            if trainer.step_count == 0 and not trainer.initial_dictionaries:  # else done by
                trainer.initialise(batch)  # the caller, e.g. from the global batch (DDP)
            output = trainer.step(batch)
            bar.update(1)
            if on_step is not None:
                on_step(trainer, output)
    model.eval()
    return TrainResult(model, trainer.history, trainer.step_count)
