"""Synthetic activations with planted concepts: the ground truth that tests and the
``synthetic`` preset measure recovery against.

Every token carries a few active concepts out of ``n_concepts``; model i sees concept c through
its own random unit vector ``views[i][c]`` (a random linear view of the shared sparse codes),
only if ``membership[c, i]``. So a concept can be universal (all models), shared by some, or
private to one, which is exactly what the universality metrics must tell apart.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from torch import Tensor


class PlantedData(NamedTuple):
    """Activations and their ground truth.

    Attributes
    ----------
    acts : dict of str to Tensor
        Model name -> ``tokens x d`` activations, row t of every model the same token.
    codes : Tensor
        ``tokens x n_concepts`` non-negative ground-truth codes.
    views : dict of str to Tensor
        Model name -> ``n_concepts x d`` unit-norm planted dictionary.
    membership : Tensor
        ``n_concepts x M`` booleans: which models see each concept (columns in ``acts`` order).
    """

    acts: dict[str, Tensor]
    codes: Tensor
    views: dict[str, Tensor]
    membership: Tensor


def planted_concepts(dims: Mapping[str, int], n_concepts: int, active: int, n_tokens: int,
                     *, seed: int = 0, token_seed: int | None = None,
                     membership: Tensor | None = None, noise: float = 0.0) -> PlantedData:
    """Draw activations of M models that are random linear views of shared sparse concepts.

    Parameters
    ----------
    dims : mapping of str to int
        Model name -> activation width.
    n_concepts : int
        Number of planted concepts.
    active : int
        Concepts active per token (uniformly drawn, magnitudes uniform in [0.5, 1.5]).
    n_tokens : int
        Number of tokens.
    seed : int
        Seeds the planted dictionaries (the views).
    token_seed : int, optional
        Seeds the tokens (codes and noise); default ``seed``. Another value draws held-out
        tokens of the same concepts.
    membership : Tensor, optional
        ``n_concepts x M`` booleans; default: every concept is seen by every model.
    noise : float
        Standard deviation of Gaussian noise added to every activation.
    """
    if not 1 <= active <= n_concepts:
        raise ValueError(f"active={active} must be between 1 and n_concepts={n_concepts}.")
    names = list(dims)
    if membership is None:
        membership = torch.ones(n_concepts, len(names), dtype=torch.bool)
    if membership.shape != (n_concepts, len(names)):
        raise ValueError(f"membership must have shape ({n_concepts}, {len(names)}), "
                         f"got {tuple(membership.shape)}.")
    view_generator = torch.Generator().manual_seed(seed)
    views = {}
    for name, width in dims.items():
        view = torch.randn(n_concepts, width, generator=view_generator)
        views[name] = view / view.norm(dim=1, keepdim=True)
    generator = torch.Generator().manual_seed(seed if token_seed is None else token_seed)
    chosen = torch.rand(n_tokens, n_concepts, generator=generator).argsort(dim=1)[:, :active]
    magnitudes = 0.5 + torch.rand(n_tokens, active, generator=generator)
    codes = torch.zeros(n_tokens, n_concepts).scatter(1, chosen, magnitudes)
    acts = {}
    for column, (name, width) in enumerate(dims.items()):
        seen = codes * membership[:, column].to(codes.dtype)
        acts[name] = seen @ views[name] + noise * torch.randn(n_tokens, width,
                                                              generator=generator)
    return PlantedData(acts, codes, views, membership)


def best_cosine(planted: Tensor, learned: Tensor) -> Tensor:
    """For each planted direction (row), the highest cosine with any learned row."""
    planted = planted / planted.norm(dim=1, keepdim=True)
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (planted @ learned.T).max(dim=1).values


def token_batches(acts: Mapping[str, Tensor], batch_size: int, *, seed: int = 0) -> list[dict]:
    """Split aligned activations into shuffled, aligned batches (one epoch)."""
    n_tokens = next(iter(acts.values())).shape[0]
    order = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))
    return [{name: a[order[i:i + batch_size]] for name, a in acts.items()}
            for i in range(0, n_tokens - batch_size + 1, batch_size)]
