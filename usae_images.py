"""Images: list a folder (flat or one sub-folder per class), decode any file robustly to RGB.

Every image of the project goes through here, so that the activation cache, the backbones and
the notebooks see the same pixels. A bad file is never a crash: :func:`open_image` returns the
reason instead, and the cache lists it.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
from PIL import Image, ImageOps

import usae_io

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Above this many pixels an image is not decoded at full size: a 40-megapixel RGB decode is
# already 120 MB, and every backbone squashes the image to 224x224 anyway.
MAX_PIXELS = 40_000_000
_WNID_NAME = re.compile(r"^n\d{8}(?:_\d+)?_(.+)$")  # WNID_IMAGEID_label or WNID_label



@dataclass(frozen=True)
class ImageSet:
    """An ordered list of images: ``paths`` relative to ``root`` (sorted, POSIX) and labels."""

    root: Path
    paths: tuple[str, ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, index: int) -> Path:
        """Full path of image ``index``."""
        return self.root / self.paths[index]

    def subset(self, indices: Iterable[int]) -> "ImageSet":
        """The images at ``indices``, in that order."""
        indices = list(indices)
        return ImageSet(self.root, tuple(self.paths[i] for i in indices),
                        tuple(self.labels[i] for i in indices))

    def sha256(self) -> str:
        """Hash of the (path, label) list: two image sets with equal hashes are the same list."""
        return usae_io.sha256_json([[p, l] for p, l in zip(self.paths, self.labels)])


def _label_from_name(stem: str) -> str:
    match = _WNID_NAME.match(stem)
    return match.group(1) if match else stem


def list_images(root: str | os.PathLike) -> ImageSet:
    """List the images under ``root``.

    Two layouts are understood, also mixed: a flat folder, where the label comes from the file
    name (``WNID_IMAGEID_label.jpg`` and ``WNID_label.jpg`` give ``label``, any other name gives
    its stem), and one sub-folder per class as ImageNet, where the label is the top-level folder
    name (sub-folders are searched recursively). Extensions: jpg, jpeg, png, bmp, webp, tif,
    tiff, in any case. Hidden files and folders are ignored.

    Parameters
    ----------
    root : path
        The folder.

    Returns
    -------
    ImageSet
        Sorted by relative path, so the order does not depend on the file system.

    Raises
    ------
    FileNotFoundError
        ``root`` is missing or not a folder.
    ValueError
        ``root`` holds no image.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder; pass a "
                                "folder of images (flat, or one sub-folder per class).")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    if not found:
        raise ValueError(f"no image found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} in "
                         "any case, recursively); point to a folder of images or to one with a "
                         "sub-folder per class.")
    found.sort()
    labels = tuple(p.split("/", 1)[0] if "/" in p else _label_from_name(Path(p).stem)
                   for p in found)
    return ImageSet(root, tuple(found), labels)


def shared_data_root() -> Path:
    """The project's shared data folder: env ``USAE_SHARED_DATA``, else ``../shared/data``."""
    if os.environ.get("USAE_SHARED_DATA"):
        return Path(os.environ["USAE_SHARED_DATA"]).expanduser()
    return Path(__file__).resolve().parent.parent / "shared" / "data"


def default_cache_dir() -> Path:
    """Where derived files go by default: env ``USAE_CACHE_DIR``, else ``~/.cache/usae`` (also
    the converted weights of ``usae_weights``)."""
    if os.environ.get("USAE_CACHE_DIR"):
        return Path(os.environ["USAE_CACHE_DIR"]).expanduser()
    return Path.home() / ".cache" / "usae"


# Photographs that scikit-image ships inside its wheel (no download). Greyscale ones become RGB.
_SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass",
                   "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle",
                   "retina", "rocket")


def default_images(cache_dir: str | os.PathLike | None = None) -> ImageSet:
    """The offline default images.

    ``imagenet-200x5`` of the shared data folder (:func:`shared_data_root`) when it is there;
    otherwise the photographs bundled with scikit-image, written once as PNG files to
    ``<cache_dir>/skimage-photos`` so that everything downstream sees a folder.

    Parameters
    ----------
    cache_dir : path, optional
        Defaults to :func:`default_cache_dir`.
    """
    shared = shared_data_root() / "imagenet-200x5"
    if shared.is_dir() and any(shared.iterdir()):
        return list_images(shared)
    folder = Path(cache_dir or default_cache_dir()) / "skimage-photos"
    if not folder.is_dir():
        import skimage.data

        folder.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and renamed, so a crash never leaves a half-filled folder.
        staging = Path(tempfile.mkdtemp(prefix=".skimage-photos.", dir=folder.parent))
        for name in _SKIMAGE_PHOTOS:
            pixels = (skimage.data.stereo_motorcycle()[0] if name == "motorcycle"
                      else getattr(skimage.data, name)())
            Image.fromarray(pixels).convert("RGB").save(staging / f"{name}.png")
        try:
            os.replace(staging, folder)
        except OSError:  # another process won the race: keep its folder
            shutil.rmtree(staging, ignore_errors=True)
    return list_images(folder)


class OpenedImage(NamedTuple):
    """Result of :func:`open_image`: an RGB image, or ``None`` and the reason it failed."""

    image: Image.Image | None
    reason: str | None


def open_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> OpenedImage:
    """Decode an image fully and return it as 8-bit RGB, or the reason it cannot be used.

    Never raises for a bad file (truncated, not an image, empty, too large); the reason string
    says what is wrong. Conversions:

    - transparency (RGBA, LA, PA, palette or greyscale with a transparent colour) is composited
      on **white**, as a viewer shows it on a page; dropping alpha instead would expose whatever
      colour the transparent pixels store (often black);
    - 16-bit greyscale (``I;16``) is divided by 257; 32-bit ``I`` is kept if within 0..255,
      divided by 257 if within 0..65535, else min-max rescaled; float ``F`` is multiplied by
      255 if within 0..1, else min-max rescaled;
    - CMYK, palette, greyscale and bilevel images go through PIL's ``convert("RGB")``;
    - the EXIF orientation is applied, so pixels are upright as a viewer shows them;
    - multi-frame files give their first frame.

    Size limit: above ``max_pixels`` a JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg
    (``draft``), the smallest reduction that fits, which is cheap and harmless since every
    backbone squashes to 224x224; other formats, or JPEGs that still do not fit, are refused.
    PIL's own decompression-bomb guard (twice ``Image.MAX_IMAGE_PIXELS``) also applies.

    Parameters
    ----------
    path : path
        The image file.
    max_pixels : int
        Largest width x height decoded.

    Returns
    -------
    OpenedImage
        ``(image, None)`` on success, ``(None, reason)`` otherwise.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return OpenedImage(None, "empty file (0 bytes)")
        with warnings.catch_warnings():
            # We apply our own limit below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:  # draft() does nothing for formats but JPEG
                    scale = next((s for s in (2, 4, 8)
                                  if math.ceil(width / s) * math.ceil(height / s) <= max_pixels), 8)
                    image.draft(None, (max(1, width // scale), max(1, height // scale)))
                if image.size[0] * image.size[1] > max_pixels:
                    return OpenedImage(None, f"too large: {width}x{height} pixels is above the "
                                       f"limit of {max_pixels:,}; downscale the file or raise "
                                       "max_pixels")
                image.load()
                try:
                    ImageOps.exif_transpose(image, in_place=True)
                except Exception:  # a broken EXIF block should not cost us the pixels
                    pass
                return OpenedImage(to_rgb(image), None)
    except Image.DecompressionBombError as error:
        return OpenedImage(None, f"refused by PIL as a decompression bomb: {error}")
    except Exception as error:  # any decoder failure is a property of the file, not of the run
        return OpenedImage(None, f"cannot decode ({type(error).__name__}: {error})")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of an image of any PIL mode (the conversions of :func:`open_image`).

    Transparency is composited on white; the released pipeline's loader (``convert("RGB")``)
    drops alpha instead, which differs only for transparent images (ImageNet has none).
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if mode.startswith("I;16"):
            values = values / 257.0
        elif mode == "I" and low >= 0 and high <= 255:
            pass
        elif mode == "I" and low >= 0 and high <= 65535:
            values = values / 257.0
        elif mode == "F" and low >= 0 and high <= 1:
            values = values * 255.0
        else:
            values = (values - low) * (255.0 / (high - low)) if high > low else values * 0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")
