"""The paper's quantitative results (sections 4.2 to 4.6) as functions of sparse codes.

Codes are stored sparsely (the k selected indices and their fp16 values per token) and every
statistic is accumulated in streaming passes, so the full 50,000-image ImageNet validation set
at the paper's sizes fits in memory (see :func:`analysis_memory_bytes`).

Definitions follow ``usae-spec.md`` section 5; where the paper and the released code differ
both forms are given, clearly named. From the project this module imports ``usae_core`` (the
model and its firing threshold) and ``usae_io`` (the atomic writer of ``metrics.json``).
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

import usae_core as core
import usae_io

FIRING_THRESHOLD = core.FIRING_THRESHOLD  # tau of the released code, on standardised codes


# ----------------------------------------------------------------------------------------------
# Sparse codes


class SparseCodes(NamedTuple):
    """Top-k codes of a set of tokens: ``indices`` and ``values`` are both ``tokens x k``."""

    indices: Tensor  # int16 when n_concepts < 32768, else int32
    values: Tensor  # float16
    n_concepts: int

    def __len__(self) -> int:
        return self.indices.shape[0]

    @property
    def nbytes(self) -> int:
        return self.indices.nbytes + self.values.nbytes

    def rows(self, start: int, stop: int) -> "SparseCodes":
        return SparseCodes(self.indices[start:stop], self.values[start:stop], self.n_concepts)

    def dense(self) -> Tensor:
        """The ``tokens x n`` float32 codes (for small inputs and tests)."""
        out = torch.zeros(len(self), self.n_concepts)
        return out.scatter_(1, self.indices.long(), self.values.float())

    @staticmethod
    def concatenate(parts: Sequence["SparseCodes"]) -> "SparseCodes":
        return SparseCodes(torch.cat([p.indices for p in parts]),
                           torch.cat([p.values for p in parts]), parts[0].n_concepts)


def _index_dtype(n_concepts: int) -> torch.dtype:
    return torch.int16 if n_concepts <= torch.iinfo(torch.int16).max else torch.int32


def to_sparse(encoding: core.Encoding, n_concepts: int) -> SparseCodes:
    """Keep the selected indices and their values from an encoder's output."""
    values = encoding.codes.gather(1, encoding.indices)
    return SparseCodes(encoding.indices.to(_index_dtype(n_concepts)).cpu(),
                       values.to(torch.float16).cpu(), n_concepts)


def sparse_decode(codes: SparseCodes, dictionary: Tensor) -> Tensor:
    """``codes @ dictionary`` touching only the k selected rows of the dictionary per token."""
    return F.embedding_bag(codes.indices.long().to(dictionary.device), dictionary,
                           per_sample_weights=codes.values.to(dictionary.device, dictionary.dtype),
                           mode="sum")


# ----------------------------------------------------------------------------------------------
# Reconstruction (section 4.2): pure functions and their streaming form


def mse(target: Tensor, recon: Tensor) -> float:
    """Element-mean squared error (Table 1's MSE, on standardised activations)."""
    return (target.double() - recon.double()).square().mean().item()


def r2_paper(target: Tensor, recon: Tensor) -> float:
    """The paper's and released code's R^2: the baseline is ONE scalar mean over all entries.

    ``1 - mean((x - x_hat)^2) / (mean((x - mean(x))^2) + 1e-6)``. More generous than
    :func:`r2_per_dim` whenever the channel means differ.
    """
    x = target.double()
    return 1 - mse(target, recon) / ((x - x.mean()).square().mean().item() + 1e-6)


def r2_per_dim(target: Tensor, recon: Tensor) -> float:
    """Explained variance with a per-dimension mean baseline (1 - FVU, as Gao et al.)."""
    x = target.double()
    residual = (x - recon.double()).square().sum()
    return 1 - (residual / (x - x.mean(dim=0)).square().sum()).item()


class ReconstructionAccumulator:
    """Streaming sums that give :func:`mse`, :func:`r2_paper` and :func:`r2_per_dim` of the
    concatenation of every ``update``, in float64."""

    def __init__(self, width: int):
        self.count = 0
        self.squared_error = 0.0
        self.sums = torch.zeros(width, dtype=torch.float64)
        self.sums_of_squares = torch.zeros(width, dtype=torch.float64)

    def update(self, target: Tensor, recon: Tensor) -> None:
        x = target.detach().double().cpu()
        self.count += x.shape[0]
        self.squared_error += (x - recon.detach().double().cpu()).square().sum().item()
        self.sums += x.sum(dim=0)
        self.sums_of_squares += x.square().sum(dim=0)

    def mse(self) -> float:
        return self.squared_error / (self.count * self.sums.numel())

    def r2_paper(self) -> float:
        entries = self.count * self.sums.numel()
        mean = self.sums.sum().item() / entries
        variance = self.sums_of_squares.sum().item() / entries - mean ** 2
        return 1 - self.mse() / (variance + 1e-6)

    def r2_per_dim(self) -> float:
        centred = (self.sums_of_squares - self.sums.square() / self.count).sum().item()
        return 1 - self.squared_error / centred


class Reconstruction(NamedTuple):
    """M x M matrices, rows = source (encoder), columns = target (decoder)."""

    names: list[str]
    r2_paper: list[list[float]]
    r2_per_dim: list[list[float]]
    mse: list[list[float]]


class EncodedDataset(NamedTuple):
    """One pass over a token set: every model's self-encoded sparse codes, row-aligned, and the
    cross-reconstruction matrices."""

    codes: dict[str, SparseCodes]
    reconstruction: Reconstruction


@torch.no_grad()
def encode_dataset(model: core.USAE, batches: Iterable[Mapping[str, Tensor]], *,
                   device: str | torch.device | None = None) -> EncodedDataset:
    """Encode every batch with every model's encoder (eval mode) and decode into every model.

    Parameters
    ----------
    model : USAE
    batches : iterable of dict
        Raw (unstandardised) activations, row-aligned across models; e.g. a cache read in order.
    device : optional
        Where to compute; defaults to the model's device.
    """
    model.eval()
    device = device or next(model.parameters()).device
    names = model.names
    accumulators = {(s, t): ReconstructionAccumulator(model.dims[t]) for s in names for t in names}
    parts: dict[str, list[SparseCodes]] = {name: [] for name in names}
    dictionaries = {name: model.dictionary(name).to(device) for name in names}
    # Metrics in the released scalar standardisation's frame, also when channels are centred.
    offsets = {name: model.scalar_frame_offset(name).to(device) for name in names}
    for batch in batches:
        targets = {n: model.standardize(n, batch[n].to(device, torch.float32)) for n in names}
        for source in names:
            encoding = model.encode_full(source, targets[source], standardized=True)
            codes = to_sparse(encoding, model.n_concepts)
            parts[source].append(codes)
            for target in names:
                recon = encoding.codes @ dictionaries[target]
                accumulators[source, target].update(targets[target] + offsets[target],
                                                    recon + offsets[target])
    if not parts[names[0]]:
        raise ValueError("encode_dataset got no batches: the token set is empty.")
    matrix = {key: [[getattr(accumulators[s, t], key)() for t in names] for s in names]
              for key in ("r2_paper", "r2_per_dim", "mse")}
    return EncodedDataset({n: SparseCodes.concatenate(p) for n, p in parts.items()},
                          Reconstruction(names, **matrix))


# ----------------------------------------------------------------------------------------------
# Firing, co-firing, energy (sections 4.1 and 4.3)


class ConceptStats(NamedTuple):
    """Counts over a token set (rows aligned across models).

    Attributes
    ----------
    names : list of str
    fires : Tensor
        ``M x n`` int64: tokens where concept c of model i exceeds the threshold.
    cofires : Tensor
        ``n`` int64: tokens where every model fires on c at the same image and position.
    code_sums : Tensor
        ``M x n`` float64: sum over tokens of each concept's code (zeros included).
    n_tokens : int
    """

    names: list[str]
    fires: Tensor
    cofires: Tensor
    code_sums: Tensor
    n_tokens: int


def concept_statistics(codes: Mapping[str, SparseCodes], *, threshold: float = FIRING_THRESHOLD,
                       chunk_tokens: int = 1 << 18) -> ConceptStats:
    """Fires, co-fires and code sums of row-aligned sparse codes, in chunks of tokens."""
    names = list(codes)
    lengths = {name: len(c) for name, c in codes.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"codes must be row-aligned across models, got lengths {lengths}.")
    n = codes[names[0]].n_concepts
    n_tokens = lengths[names[0]]
    fires = torch.zeros(len(names), n, dtype=torch.int64)
    cofires = torch.zeros(n, dtype=torch.int64)
    code_sums = torch.zeros(len(names), n, dtype=torch.float64)
    for start in range(0, n_tokens, chunk_tokens):
        keys = []
        for row, name in enumerate(names):
            chunk = codes[name].rows(start, start + chunk_tokens)
            indices, values = chunk.indices.long(), chunk.values.float()
            fired = values > threshold
            fires[row] += torch.bincount(indices[fired], minlength=n)
            code_sums[row] += torch.bincount(indices.flatten(), weights=values.flatten().double(),
                                             minlength=n)
            tokens = torch.arange(len(chunk)).unsqueeze(1).expand_as(indices)
            keys.append(tokens[fired] * n + indices[fired])  # unique per model: TopK indices are
        unique, counts = torch.unique(torch.cat(keys), return_counts=True)
        cofires += torch.bincount(unique[counts == len(names)] % n, minlength=n)
    return ConceptStats(names, fires, cofires, code_sums, n_tokens)


def firing_entropy(fires: Tensor) -> Tensor:
    """Normalised entropy of each concept's firing distribution over models (Eqs. 12-13).

    1 when every model fires equally often, 0 when one model does all the firing; a concept
    that no model fires gets 0, as the released code.
    """
    fires = fires.double()
    n_models = fires.shape[0]
    if n_models < 2:
        raise ValueError("firing entropy needs at least two models.")
    totals = fires.sum(dim=0, keepdim=True)
    p = fires / totals.clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(dim=0) / math.log(n_models)
    return torch.where(totals.squeeze(0) > 0, entropy, torch.zeros_like(entropy)).clamp(0, 1)


def cofire_proportion(fires: Tensor, cofires: Tensor) -> Tensor:
    """``M x n``: share of model i's firings of c where every model fires too (Eq. 14)."""
    return torch.where(fires > 0, cofires.double() / fires.double().clamp_min(1),
                       torch.zeros_like(fires, dtype=torch.float64))


def chance_cofire_proportion(fires: Tensor, n_tokens: int) -> Tensor:
    """``M x n``: the co-fire proportion that independent firing would give (the chance level).

    If the models fired each concept independently, at their measured rates ``fires / n_tokens``,
    a firing of concept c in model i would find every other model firing c with probability
    ``prod_{j != i} fires[j, c] / n_tokens``. A co-fire proportion far above this comes from
    models firing the concept on the same tokens, not from frequent firing alone.
    """
    rates = fires.double() / n_tokens
    others = torch.stack([torch.cat([rates[:i], rates[i + 1:]]).prod(dim=0)
                          for i in range(len(rates))])
    return torch.where(fires > 0, others, torch.zeros_like(others))


def energy(code_sums: Tensor, n_tokens: int, dictionary_norms: Tensor | None = None, *,
           squared: bool = False) -> Tensor:
    """``M x n`` concept importance ``||E_x[z_k] D_k||`` (code) or its square (paper, Eq. 9).

    With unit-norm dictionary rows this is the mean code of the concept over all tokens.
    """
    values = code_sums / n_tokens
    if dictionary_norms is not None:
        values = values * dictionary_norms.double()
    return values.square() if squared else values


def aggregate_energy(per_model: Tensor) -> Tensor:
    """The released ranking: energy summed over models (Fig. 6c plots it divided by M)."""
    return per_model.sum(dim=0)


def dead_fraction(fires: Tensor, names: Sequence[str]) -> dict[str, float]:
    """Share of concepts that never fire, per model and over all models (``all``)."""
    dead = {name: (fires[i] == 0).double().mean().item() for i, name in enumerate(names)}
    dead["all"] = (fires.sum(dim=0) == 0).double().mean().item()
    return dead


class LogLogFit(NamedTuple):
    r: float
    slope: float
    n_concepts: int


def energy_cofire_fit(aggregate: Tensor, cofires: Tensor, n_models: int,
                      min_cofires: int = 0) -> LogLogFit:
    """Pearson r and slope of log10(energy / M) against log10(co-fires) (Fig. 6c).

    Concepts with no co-fire or no energy are dropped, as the released plot; ``min_cofires``
    keeps only concepts with at least that many co-fires (the paper's right panel: 1,000).
    """
    x, y = cofires.double(), aggregate.double() / n_models
    keep = (x > 0) & (y > 0) & (x >= min_cofires)
    log_x, log_y = torch.log10(x[keep]).numpy(), torch.log10(y[keep]).numpy()
    if keep.sum() < 3 or np.ptp(log_x) == 0 or np.ptp(log_y) == 0:  # no line to fit
        return LogLogFit(float("nan"), float("nan"), int(keep.sum()))
    r = float(np.corrcoef(log_x, log_y)[0, 1])
    slope = float(np.polyfit(log_x, log_y, 1)[0])
    return LogLogFit(r, slope, int(keep.sum()))


def top_concepts(values: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest values, largest first."""
    return torch.argsort(values, descending=True, stable=True)[:count]


# ----------------------------------------------------------------------------------------------
# Consistency with independent SAEs (section 4.4)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    a = a.double() / a.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b.double() / b.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


class Matching(NamedTuple):
    """One-to-one matching of rows of ``a`` to rows of ``b`` maximising total cosine."""

    rows: np.ndarray
    columns: np.ndarray
    cosines: np.ndarray


def hungarian_match(a: Tensor, b: Tensor) -> Matching:
    """Hungarian algorithm (scipy) on cosine similarity between dictionary rows."""
    similarity = cosine_matrix(a, b).numpy()
    rows, columns = linear_sum_assignment(similarity, maximize=True)
    return Matching(rows, columns, similarity[rows, columns])


def matching_auc(cosines: np.ndarray) -> float:
    """Area under "share of matches with cosine >= t" for t in [0, 1].

    The paper does not define its AUC; this reading equals the mean of the cosines clipped to
    [0, 1] and gives the paper's random baseline of about 0.13 (see usae-spec.md 5.5).
    """
    return float(np.clip(cosines, 0.0, 1.0).mean())


def random_dictionary_like(dictionary: Tensor, *, seed: int = 0) -> Tensor:
    """Gaussian rows with the scalar mean and std of ``dictionary``'s entries (the baseline)."""
    generator = torch.Generator().manual_seed(seed)
    values = dictionary.detach().double()
    noise = torch.randn(values.shape, generator=generator, dtype=torch.float64)
    return values.mean() + values.std() * noise


def consistency(usae_dictionary: Tensor, independent_dictionary: Tensor, *,
                subset: Tensor | None = None, seed: int = 0) -> dict:
    """Match a USAE dictionary to an independently trained SAE's one.

    Returns
    -------
    dict
        ``share_gt_0_5`` (share of USAE concepts matched with cosine > 0.5), ``auc``,
        ``mean_cosine``, ``random_baseline_auc`` (a random dictionary with the independent
        one's mean and std, matched the same way), ``cosines`` (per matched concept) and
        ``random_baseline_cosines`` (per matched random row). With ``subset``, only those USAE
        concepts are matched (the top-1,000 co-firing ones), and as many random rows.
    """
    usae_rows = usae_dictionary.detach() if subset is None else usae_dictionary.detach()[subset]
    matched = hungarian_match(usae_rows, independent_dictionary.detach())
    baseline = hungarian_match(random_dictionary_like(independent_dictionary, seed=seed)
                               [:len(usae_rows)], independent_dictionary.detach())
    return {"share_gt_0_5": float((matched.cosines > 0.5).mean()),
            "auc": matching_auc(matched.cosines),
            "mean_cosine": float(matched.cosines.mean()),
            "random_baseline_auc": matching_auc(baseline.cosines),
            "cosines": matched.cosines, "random_baseline_cosines": baseline.cosines}


class ModelConsistency(NamedTuple):
    summary: dict[str, dict]  # model -> the numbers of :func:`consistency`, no arrays
    cosines: dict[str, np.ndarray]  # model -> matched cosine of each USAE concept
    baselines: dict[str, np.ndarray]  # model -> matched cosine of each random row


def consistency_by_model(usae_dictionaries: Mapping[str, Tensor],
                         independent_dictionaries: Mapping[str, Tensor], *,
                         subset: Tensor | None = None, seed: int = 0) -> ModelConsistency:
    """:func:`consistency` of each model's USAE dictionary with its independent SAE's (Fig. 7:
    the matched cosines, and the random baseline's beside them), in ``usae_dictionaries``' order.
    """
    summary, cosines, baselines = {}, {}, {}
    for name, usae_dictionary in usae_dictionaries.items():
        result = consistency(usae_dictionary, independent_dictionaries[name], subset=subset,
                             seed=seed)
        cosines[name] = result.pop("cosines")
        baselines[name] = result.pop("random_baseline_cosines")
        summary[name] = result
    return ModelConsistency(summary, cosines, baselines)


# ----------------------------------------------------------------------------------------------
# Model-unique concepts (section 4.6) and top images


class UniqueConcept(NamedTuple):
    concept: int
    model: str
    firing_entropy: float
    share: float  # share of all firings that are the dominant model's
    fires: int


def model_unique_concepts(fires: Tensor, names: Sequence[str], *, max_entropy: float = 0.2,
                          min_share: float = 0.9, min_fires: int = 1) -> list[UniqueConcept]:
    """Concepts whose firing is concentrated on one model, most-fired first."""
    entropy = firing_entropy(fires)
    totals = fires.sum(dim=0)
    share = fires.max(dim=0).values.double() / totals.double().clamp_min(1)
    dominant = fires.argmax(dim=0)
    keep = (entropy <= max_entropy) & (share >= min_share) & (totals >= min_fires)
    found = [UniqueConcept(int(c), names[int(dominant[c])], float(entropy[c]), float(share[c]),
                           int(fires[dominant[c], c])) for c in torch.nonzero(keep).flatten()]
    return sorted(found, key=lambda u: (-u.fires, u.concept))


_FEW_CONCEPTS = 8  # above this many, one pass building all columns beats one per concept


def image_concept_means(codes: SparseCodes, tokens_per_image: int,
                        concepts: Sequence[int] | None = None) -> Tensor:
    """``images x n`` mean code over each image's tokens (rows grouped by image, in order).

    With ``concepts``, only those columns, in that order (``images x len(concepts)``). A few
    concepts cost one comparison pass over the codes each, without the ``images x n`` matrix,
    so one concept over thousands of images takes a fraction of its time and memory.
    """
    n_images = len(codes) // tokens_per_image
    if n_images * tokens_per_image != len(codes):
        raise ValueError(f"{len(codes)} tokens is not a whole number of images of "
                         f"{tokens_per_image} tokens.")
    if concepts is None:
        image = torch.arange(len(codes)) // tokens_per_image
        keys = image.unsqueeze(1) * codes.n_concepts + codes.indices.long()
        sums = torch.zeros(n_images * codes.n_concepts, dtype=torch.float64)
        sums.index_add_(0, keys.flatten(), codes.values.double().flatten())
        return (sums / tokens_per_image).view(n_images, codes.n_concepts).float()
    concepts = torch.as_tensor(list(concepts), dtype=torch.long)
    if len(concepts) and (concepts.min() < 0 or concepts.max() >= codes.n_concepts):
        raise IndexError(f"concepts must be in 0..{codes.n_concepts - 1}.")
    wanted, order = torch.unique(concepts, return_inverse=True)
    if len(wanted) > _FEW_CONCEPTS:
        return image_concept_means(codes, tokens_per_image)[:, concepts]
    sums = torch.zeros(len(wanted), n_images, dtype=torch.float64)
    for column, concept in enumerate(wanted.tolist()):
        # Same summands in the same order as the full matrix: the same float64 sums.
        token, slot = torch.nonzero(codes.indices == concept, as_tuple=True)
        sums[column].index_add_(0, token // tokens_per_image, codes.values[token, slot].double())
    return (sums / tokens_per_image).T.float()[:, order]


def top_images(codes: SparseCodes | Sequence[SparseCodes], tokens_per_image: int,
               concepts: Sequence[int], count: int, *, chunk_images: int = 2048) -> Tensor:
    """``len(concepts) x count`` indices of the images with the highest mean code (as the
    released code's ranking by mean heatmap), highest first, ties by lower index; found chunk
    by chunk with bounded memory.

    Given the row-aligned codes of several models, images are ranked by the concept's mean
    code averaged over the models (the released demo's ranking, the same images for all).
    """
    models = [codes] if isinstance(codes, SparseCodes) else list(codes)
    if len({len(m) for m in models}) != 1:
        raise ValueError(f"codes must be row-aligned across models, got lengths "
                         f"{[len(m) for m in models]}.")
    concepts = list(concepts)
    n_images = len(models[0]) // tokens_per_image
    best_values = torch.full((len(concepts), 0), -1.0)
    best_images = torch.zeros((len(concepts), 0), dtype=torch.long)
    for first in range(0, n_images, chunk_images):
        last = min(n_images, first + chunk_images)
        rows = (first * tokens_per_image, last * tokens_per_image)
        means = sum(image_concept_means(m.rows(*rows), tokens_per_image, concepts)
                    for m in models).T / len(models)
        values = torch.cat([best_values, means], dim=1)
        images = torch.cat([best_images, torch.arange(first, last).expand(len(concepts), -1)], 1)
        order = torch.argsort(values, dim=1, descending=True, stable=True)[:, :count]
        best_values, best_images = values.gather(1, order), images.gather(1, order)
    return best_images


# ----------------------------------------------------------------------------------------------
# Scale


def sparse_storage_ratio(n_concepts: int, k: int) -> float:
    """Bytes of sparse codes (index + fp16 value per kept code) over dense fp32 codes."""
    index_bytes = torch.empty(0, dtype=_index_dtype(n_concepts)).element_size()
    return k * (index_bytes + 2) / (n_concepts * 4)


def analysis_memory_bytes(n_images: int, tokens_per_image: int, n_models: int, k: int,
                          n_concepts: int) -> dict[str, int]:
    """What an analysis of ``n_images`` keeps in memory: the sparse codes of every model and
    the per-concept counters (transient per-batch tensors are bounded by the batch size)."""
    tokens = n_images * tokens_per_image
    index_bytes = torch.empty(0, dtype=_index_dtype(n_concepts)).element_size()
    codes = n_models * tokens * k * (index_bytes + 2)
    counters = n_models * n_concepts * (8 + 8) + n_concepts * 8
    return {"sparse_codes": codes, "counters": counters, "total": codes + counters}


# ----------------------------------------------------------------------------------------------
# metrics.json


def dictionary_norms(model: core.USAE) -> Tensor:
    """``M x n`` norms of every dictionary row (1 up to rounding; kept for exactness)."""
    return torch.stack([model.dictionary(name).detach().norm(dim=1).cpu()
                        for name in model.names]).double()


def universality(stats: ConceptStats, norms: Tensor | None = None, *, top: int = 1000) -> dict:
    """Section 4.3's numbers from concept statistics.

    Returns the firing entropy of every concept, the mean co-fire proportion per model over the
    ``top`` concepts of highest aggregated energy (released form) and its chance level under
    independent firing (:func:`chance_cofire_proportion`), the log-log fit of energy
    against co-fires for all concepts and for those with >= 1,000 co-fires, the dead fractions,
    and the per-model energies in both forms.
    """
    per_model = energy(stats.code_sums, stats.n_tokens, norms)
    aggregate = aggregate_energy(per_model)
    ranked = top_concepts(aggregate, min(top, len(aggregate)))
    proportion = cofire_proportion(stats.fires, stats.cofires)
    chance = chance_cofire_proportion(stats.fires, stats.n_tokens)
    fit_all = energy_cofire_fit(aggregate, stats.cofires, len(stats.names))
    fit_1000 = energy_cofire_fit(aggregate, stats.cofires, len(stats.names), min_cofires=1000)
    return {
        "firing_entropy": firing_entropy(stats.fires).tolist(),
        "cofire_proportion_top1000": {name: float(proportion[i, ranked].mean())
                                      for i, name in enumerate(stats.names)},
        "cofire_proportion_top1000_chance": {name: float(chance[i, ranked].mean())
                                             for i, name in enumerate(stats.names)},
        "energy_vs_cofire": {"r": fit_all.r, "slope": fit_all.slope,
                             "n_concepts": fit_all.n_concepts, "r_ge1000": fit_1000.r,
                             "slope_ge1000": fit_1000.slope,
                             "n_concepts_ge1000": fit_1000.n_concepts},
        "dead_fraction": dead_fraction(stats.fires, stats.names),
        "energy": {name: per_model[i].tolist() for i, name in enumerate(stats.names)},
        "energy_squared": {name: per_model[i].square().tolist()
                           for i, name in enumerate(stats.names)},
        "cofires": stats.cofires.tolist(),
    }


def reconstruction_metrics(reconstruction: Reconstruction) -> dict:
    return {"r2_paper": reconstruction.r2_paper, "r2_per_dim": reconstruction.r2_per_dim,
            "mse": reconstruction.mse}


def write_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """Write ``metrics`` as JSON, atomically; NaN becomes null so that any JSON reader works."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return clean(value.item())
        return value

    text = json.dumps(clean(metrics), indent=1, sort_keys=True)
    usae_io.atomic_write(path, text)
