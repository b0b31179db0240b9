"""Shared pytest fixtures: the shared photo folder, a fake backbone, position-coded images."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

# ---- activation cache (usae_cache) fixtures ----------------------------------------------------


def _shared_data_root() -> Path:
    if os.environ.get("USAE_SHARED_DATA"):
        return Path(os.environ["USAE_SHARED_DATA"]).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The project's real photos (``../shared/data`` or env USAE_SHARED_DATA); skip if absent."""
    root = _shared_data_root()
    if not (root / "imagenet-200x5").is_dir():
        pytest.skip(f"shared photos not found at {root} (set USAE_SHARED_DATA to the folder "
                    "holding imagenet-200x5/)")
    return root


@dataclasses.dataclass(frozen=True)
class FakePreprocessing:
    """Squash to 224x224 (bicubic) and keep pixel values in 0..255 (no normalisation)."""

    size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


class FakeBackbone(torch.nn.Module):
    """Deterministic stand-in for ``usae_backbones.Backbone``: one fixed conv of stride 16.

    Output channel c < 3 is the mean of input colour c over the token's 16x16 patch, so an
    image can encode its identity and each patch's position in its pixels (see
    ``write_coded_images``); the other channels are seeded random filters.
    """

    grid = 14

    def __init__(self, name: str, width: int, seed: int = 0) -> None:
        super().__init__()
        assert width >= 3
        self.name, self.width, self.seed = name, width, seed
        self.preprocessing = FakePreprocessing()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(width, 3, 16, 16, generator=generator) / 768
        weight[:3] = 0
        for c in range(3):
            weight[c, c] = 1 / 256
        self.conv = torch.nn.Conv2d(3, width, 16, stride=16, bias=False)
        self.conv.weight.data.copy_(weight)
        self.conv.weight.requires_grad_(False)
        self.calls = 0  # forward calls, to check that finished work is not recomputed

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((224, 224), Image.BICUBIC)
        return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(pixels).flatten(2).transpose(1, 2)

    def describe(self) -> dict:
        return {"name": self.name, "weights": f"fake-conv-seed{self.seed}", "layer": "conv16",
                "grid": self.grid, "preprocessing": dataclasses.asdict(self.preprocessing)}


@pytest.fixture
def make_fake_backbone():
    """Factory ``(name, width, seed=0) -> FakeBackbone``."""
    return FakeBackbone


def coded_image(image_id: int) -> Image.Image:
    """224x224 RGB: red = grid position (row-major) of each 16x16 patch, green = identity."""
    position = np.arange(196, dtype=np.uint8).reshape(14, 14)
    pixels = np.zeros((224, 224, 3), dtype=np.uint8)
    pixels[..., 0] = np.kron(position, np.ones((16, 16), dtype=np.uint8))
    pixels[..., 1] = image_id
    pixels[..., 2] = (37 * image_id) % 256
    return Image.fromarray(pixels)


@pytest.fixture
def write_coded_images():
    """Factory ``(folder, n) -> folder``: images ``img_000.png``... with identity 1..n."""

    def write(folder: Path, n: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            coded_image(i + 1).save(folder / f"img_{i:03d}.png")
        return folder

    return write


# ---- a USAE trained on planted concepts (usae_core, usae_analysis) -----------------------------

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


class PlantedRun(NamedTuple):
    model: object  # usae_core.USAE, trained
    train: object  # usae_synthetic.PlantedData the model was trained on
    held_out: dict  # model name -> held-out activations of the same planted concepts


@pytest.fixture(scope="session")
def planted_run() -> PlantedRun:
    """Three models seeing 32 shared concepts through random linear views; trained once."""
    import usae_core
    import usae_synthetic

    dims = {"a": 40, "b": 48, "c": 56}
    train = usae_synthetic.planted_concepts(dims, n_concepts=32, active=3, n_tokens=16384, seed=0)
    model = usae_core.USAE(dims, n_concepts=64, k=3, seed=0)
    usae_core.train(model, usae_synthetic.token_batches(train.acts, 512, seed=0), 1500, seed=0,
                    lr=0.01, progress=False)
    held_out = usae_synthetic.planted_concepts(dims, 32, 3, 4096, seed=0, token_seed=1).acts
    return PlantedRun(model, train, held_out)
