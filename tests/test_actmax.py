"""Tests of usae_actmax: the parameterisation and that optimisation raises the objective."""
import numpy as np
import pytest
import torch
from PIL import Image

import usae_actmax as actmax
import usae_core as core


def photos(n=4, size=64, seed=0):
    """Smooth random images with natural-ish (1/f) spectra and correlated colours."""
    generator = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        noise = generator.normal(size=(size, size))
        spectrum = np.fft.rfft2(noise) / (1 + np.hypot(*np.meshgrid(
            np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij")) * size)
        grey = np.fft.irfft2(spectrum, s=(size, size))
        grey = (grey - grey.min()) / (grey.max() - grey.min())
        rgb = np.stack([grey, 0.8 * grey + 0.1, 0.6 * grey + 0.2], axis=-1)
        images.append(Image.fromarray((rgb * 255).astype(np.uint8)))
    return images


def test_render_gives_pixels_in_range_with_the_prior_magnitude():
    prior = actmax.image_prior(photos(), 32)
    assert prior.magnitude.shape == (3, 32, 17) and prior.colour_sqrt.shape == (3, 3)
    phase = (torch.rand(3, 32, 17, generator=torch.Generator().manual_seed(0)) * 2 - 1) * torch.pi
    image = actmax.render(phase, prior)
    assert image.shape == (3, 32, 32) and image.min() > 0 and image.max() < 1
    # Same phase, same image; another phase, another image.
    assert torch.equal(image, actmax.render(phase, prior))
    assert not torch.allclose(image, actmax.render(phase + 1, prior))


def test_random_crops_have_the_input_size_and_stay_in_range():
    config = actmax.MacoConfig(image_size=48, input_size=32, crops=3)
    crops = actmax.random_crops(torch.rand(3, 48, 48), config, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 3, 32, 32) and crops.min() >= 0 and crops.max() <= 1


def test_maximisation_raises_the_objective_far_beyond_random_images(make_fake_backbone):
    backbone = make_fake_backbone("fake", 8, seed=1)
    backbone.preprocessing = type(backbone.preprocessing)(mean=(0.5,) * 3, std=(0.25,) * 3)
    model = core.USAE({"fake": 8, "other": 5}, n_concepts=16, k=2, seed=0).eval()
    model.set_standardization({"fake": (0.0, 1.0), "other": (0.0, 1.0)})
    config = actmax.MacoConfig(steps=25, crops=2, lr=1.0)
    prior = actmax.image_prior(photos(size=64), 224)
    result = actmax.maximize_concept(model, "fake", backbone, 3, prior, config, seed=0,
                                     progress=False)
    random_images = torch.stack([actmax.render((torch.rand(3, 224, 113, generator=torch.Generator(
        ).manual_seed(s)) * 2 - 1) * torch.pi, prior) for s in range(1, 9)])
    with torch.no_grad():
        baseline = torch.tensor([actmax.concept_objective(model, "fake", backbone, image[None], 3)
                                 for image in random_images])
    assert result.objective_end > baseline.max() + 5 * baseline.std()
    assert result.objective_end > result.objective_start + 5 * baseline.std()
    assert len(result.history) == 25 and result.image.shape == (3, 224, 224)
    again = actmax.maximize_concept(model, "fake", backbone, 3, prior, config, seed=0,
                                    progress=False)
    assert torch.equal(again.image, result.image)  # seeded
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen


def test_coordinated_maximisation_gives_one_image_per_model(make_fake_backbone):
    backbones = {"a": make_fake_backbone("a", 6, seed=1), "b": make_fake_backbone("b", 7, seed=2)}
    model = core.USAE({"a": 6, "b": 7}, n_concepts=12, k=2, seed=0)
    config = actmax.MacoConfig(image_size=224, steps=2, crops=1)
    prior = actmax.image_prior(photos(size=32), 224)
    results = actmax.coordinated_maximization(model, backbones, 5, prior, config, progress=False)
    assert set(results) == {"a", "b"}
    assert not torch.equal(results["a"].image, results["b"].image)
    with pytest.raises(ValueError, match="no backbone given"):
        actmax.coordinated_maximization(model, {"a": backbones["a"]}, 5, prior, config)
    with pytest.raises(ValueError, match="outside 0..11"):
        actmax.maximize_concept(model, "a", backbones["a"], 12, prior, config)
    with pytest.raises(ValueError, match="measured at 224 px"):
        actmax.maximize_concept(model, "a", backbones["a"], 1, prior,
                                actmax.MacoConfig(image_size=64))
