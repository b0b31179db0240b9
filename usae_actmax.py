"""Coordinated activation maximisation (paper section 4.5), MaCo-style.

For one concept k, each model gets its own image, optimised through that model's whole
pipeline: pixel normalisation, backbone, tokens on the shared grid, the USAE's scalar
standardisation and the model's encoder with BatchNorm in eval mode. The objective is the mean
over tokens of concept k's pre-TopK activation (TopK gives no gradient to a concept outside the
top k; the paper does not say which activation it used, see usae-spec.md 5.6).

As MaCo (Fel et al. 2023), the image is parameterised by a learned Fourier *phase* under a fixed
*magnitude* spectrum measured on real photographs, with colours decorrelated the same way, and
every step scores random crops with a little noise. The images of different models start from
the same phase (same seed), so their differences come from the models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

import usae_checks as checks
import usae_core as core


@dataclass(frozen=True)
class MacoConfig:
    """Optimisation settings (MaCo's own: 1280-px image, 1,000 NAdam steps at lr 1.0, 6 crops
    of 0.20-0.25 of the side; these defaults are sized for a CPU)."""

    image_size: int = 224  # side of the optimised image
    input_size: int = 224  # side the backbone sees
    steps: int = 64
    lr: float = 1.0
    crops: int = 4  # random crops scored per step
    crop_scale: tuple[float, float] = (0.6, 0.9)  # crop side as a fraction of the image side
    noise: float = 0.05

    def validate(self) -> None:
        for key in ("image_size", "input_size", "steps", "crops"):
            checks.require_positive_int(getattr(self, key), key)
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}.")
        if self.lr <= 0 or self.noise < 0:
            raise ValueError("lr must be positive and noise >= 0.")


class ImagePrior(NamedTuple):
    """What the parameterisation takes from real photographs."""

    magnitude: Tensor  # 3 x size x (size // 2 + 1): mean Fourier magnitude per colour channel
    colour_sqrt: Tensor  # 3 x 3: square root of the colour covariance (recorrelates colours)


def image_prior(images: Iterable[Image.Image], size: int) -> ImagePrior:
    """Mean Fourier magnitude and colour correlation of real photographs at ``size`` px."""
    spectra, pixels = [], []
    for image in images:
        array = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC),
                           dtype=np.float64) / 255.0
        x = torch.from_numpy(array).permute(2, 0, 1)
        pixels.append(x.reshape(3, -1))
        x = (x - x.mean(dim=(1, 2), keepdim=True))
        spectra.append(torch.fft.rfft2(x, norm="ortho").abs())
    if not spectra:
        raise ValueError("image_prior needs at least one real image.")
    colours = torch.cat(pixels, dim=1)
    covariance = torch.cov(colours)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    colour_sqrt = eigenvectors @ torch.diag(eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    colour_sqrt = colour_sqrt / colour_sqrt.norm(dim=0).max()
    return ImagePrior(torch.stack(spectra).mean(dim=0).float(), colour_sqrt.float())


def render(phase: Tensor, prior: ImagePrior) -> Tensor:
    """Pixels in (0, 1), ``3 x size x size``, from a phase under the prior's magnitude."""
    size = prior.magnitude.shape[-2]
    spectrum = prior.magnitude * torch.exp(1j * phase)
    image = torch.fft.irfft2(spectrum, s=(size, size), norm="ortho")
    image = (image - image.mean()) / (image.std() + 1e-8)
    image = torch.einsum("ij,jhw->ihw", prior.colour_sqrt, image)
    return torch.sigmoid(image)


def random_crops(image: Tensor, config: MacoConfig, generator: torch.Generator) -> Tensor:
    """``crops x 3 x input x input``: random square crops (centres ~ N(0.5, 0.15)), resized."""
    size = image.shape[-1]
    out = []
    for _ in range(config.crops):
        low, high = config.crop_scale
        side = int(size * (low + (high - low) * torch.rand((), generator=generator).item()))
        side = max(side, 8)
        centre = (0.5 + 0.15 * torch.randn(2, generator=generator)).clamp(0, 1) * size
        top, left = (int(min(max(c.item() - side / 2, 0), size - side)) for c in centre)
        crop = image[:, top:top + side, left:left + side].unsqueeze(0)
        out.append(F.interpolate(crop, size=(config.input_size,) * 2, mode="bilinear",
                                 align_corners=False, antialias=True))
    crops = torch.cat(out)
    noise = config.noise * (torch.randn(crops.shape, generator=generator)
                            + torch.rand(crops.shape, generator=generator) - 0.5)
    return (crops + noise).clamp(0, 1)


def concept_objective(model: core.USAE, name: str, backbone: torch.nn.Module, pixels: Tensor,
                      concept: int) -> Tensor:
    """Mean over images and tokens of concept ``concept``'s pre-TopK activation in model
    ``name``, for pixels in [0, 1] (``B x 3 x H x W``) seen through that model's pipeline."""
    mean = torch.tensor(backbone.preprocessing.mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(backbone.preprocessing.std, dtype=pixels.dtype).view(1, 3, 1, 1)
    tokens = backbone((pixels - mean) / std)
    encoding = model.encode_full(name, tokens.reshape(-1, tokens.shape[-1]))
    return encoding.pre_codes[:, concept].mean()


class ActMaxResult(NamedTuple):
    image: Tensor  # 3 x size x size, in [0, 1]
    objective_start: float  # on the whole image resized to the input size, no noise
    objective_end: float
    history: list[float]  # the crop objective of every step


def maximize_concept(model: core.USAE, name: str, backbone: torch.nn.Module, concept: int,
                     prior: ImagePrior, config: MacoConfig = MacoConfig(), *, seed: int = 0,
                     progress: bool = True) -> ActMaxResult:
    """Optimise one image that maximises ``concept`` in model ``name``."""
    config.validate()
    if not 0 <= concept < model.n_concepts:
        raise ValueError(f"concept {concept} is outside 0..{model.n_concepts - 1}.")
    if prior.magnitude.shape[-2] != config.image_size:
        raise ValueError(f"the prior was measured at {prior.magnitude.shape[-2]} px but "
                         f"image_size is {config.image_size}: call image_prior(images, "
                         f"{config.image_size}).")
    model.eval()
    backbone.eval()
    generator = torch.Generator().manual_seed(seed)
    # A uniform phase: a Gaussian one has E[cos] = 0.61, which adds every frequency in phase
    # at the origin and starts from a bright spike.
    phase = ((torch.rand(prior.magnitude.shape, generator=generator) * 2 - 1) * torch.pi)
    phase.requires_grad_(True)
    optimizer = torch.optim.NAdam([phase], lr=config.lr)
    frozen = [p for p in list(model.parameters()) + list(backbone.parameters())
              if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)

    def whole_image_objective() -> float:
        with torch.no_grad():
            image = F.interpolate(render(phase, prior).unsqueeze(0), size=(config.input_size,) * 2,
                                  mode="bilinear", antialias=True, align_corners=False)
            return concept_objective(model, name, backbone, image, concept).item()

    try:
        start = whole_image_objective()
        history = []
        for _ in tqdm(range(config.steps), disable=not progress, desc=f"{name} concept {concept}"):
            optimizer.zero_grad(set_to_none=True)
            crops = random_crops(render(phase, prior), config, generator)
            objective = concept_objective(model, name, backbone, crops, concept)
            (-objective).backward()
            optimizer.step()
            history.append(objective.item())
        end = whole_image_objective()
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    return ActMaxResult(render(phase, prior).detach(), start, end, history)


def coordinated_maximization(model: core.USAE, backbones: Mapping[str, torch.nn.Module],
                             concept: int, prior: ImagePrior, config: MacoConfig = MacoConfig(),
                             *, seed: int = 0, progress: bool = True) -> dict[str, ActMaxResult]:
    """One image per model for the same concept, each from the same starting phase."""
    missing = set(model.names) - set(backbones)
    if missing:
        raise ValueError(f"no backbone given for models {sorted(missing)}.")
    return {name: maximize_concept(model, name, backbones[name], concept, prior, config,
                                   seed=seed, progress=progress) for name in model.names}
