"""Tests of usae_images: listing folders, decoding odd, broken and fuzzed image files."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import usae_images as ui
from conftest import BAD

# ----------------------------------------------------------------------------------------------
# Listing and decoding


def test_list_images_layouts(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("n01440764_10026_tench.jpg", "n01484850_great_white_shark.JPEG", "cat.Png",
                 "notes.txt", ".hidden.jpg"):
        (flat / name).write_bytes(b"x")
    images = ui.list_images(flat)
    assert images.paths == ("cat.Png", "n01440764_10026_tench.jpg",
                            "n01484850_great_white_shark.JPEG")
    assert images.labels == ("cat", "tench", "great_white_shark")
    assert len(images) == 3 and images.absolute(0) == flat.resolve() / "cat.Png"

    classes = tmp_path / "classes"
    (classes / "dog" / "more").mkdir(parents=True)
    (classes / "bird").mkdir()
    (classes / "dog" / "a.jpg").write_bytes(b"x")
    (classes / "dog" / "more" / "b.webp").write_bytes(b"x")
    (classes / "bird" / "n01530575_1_brambling.TIF").write_bytes(b"x")
    images = ui.list_images(classes)
    assert images.paths == ("bird/n01530575_1_brambling.TIF", "dog/a.jpg", "dog/more/b.webp")
    assert images.labels == ("bird", "dog", "dog")
    assert ui.list_images(classes).sha256() == images.sha256() != ui.list_images(flat).sha256()


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ui.list_images(tmp_path / "nowhere")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image found"):
        ui.list_images(tmp_path)


def test_list_images_shared_photos(shared_data_dir):
    train = ui.list_images(shared_data_dir / "imagenet-200x5")
    assert len(train) == 1000 and len(set(train.labels)) == 200
    assert train.labels[0] == "person" and train.labels[-1] == "burrito"
    val = ui.list_images(shared_data_dir / "imagenet-1000x1")
    assert len(val) == 1000 and val.labels[:3] == ("tench", "goldfish", "great_white_shark")
    faces = ui.list_images(shared_data_dir / "faces")  # pairs.csv is not an image
    assert len(faces) == 64 and all(label == Path(p).stem for p, label in
                                    zip(faces.paths, faces.labels))


def test_default_images_falls_back_to_skimage(tmp_path, monkeypatch):
    monkeypatch.setenv("USAE_SHARED_DATA", str(tmp_path / "no-shared-data"))
    images = ui.default_images(tmp_path / "cache")
    assert len(images) == 14 and "astronaut" in images.labels
    assert images.root == (tmp_path / "cache" / "skimage-photos").resolve()
    first = images.absolute(0).stat().st_mtime_ns
    assert ui.default_images(tmp_path / "cache") == images  # written once
    assert images.absolute(0).stat().st_mtime_ns == first
    camera = ui.open_image(images.absolute(images.labels.index("camera"))).image
    assert camera.mode == "RGB"


def test_default_images_prefers_shared_photos(shared_data_dir, monkeypatch):
    monkeypatch.setenv("USAE_SHARED_DATA", str(shared_data_dir))
    assert ui.default_images().root == (shared_data_dir / "imagenet-200x5").resolve()


def test_open_image_odd_files(odd_folder):
    results = {p.name: ui.open_image(p) for p in sorted(odd_folder.iterdir())}
    for name, (image, reason) in results.items():
        if name in BAD:
            assert image is None and reason, name
        else:
            assert reason is None and image.mode == "RGB", (name, reason)
    assert "0 bytes" in results["empty.jpg"].reason
    assert "too large" in results["huge.png"].reason
    assert "truncated" in results["truncated.jpg"].reason
    assert results["huge.jpg"].image.size == (5000, 5000)  # drafted, within MAX_PIXELS
    assert np.asarray(results["rgba.png"].image).min() == 255  # transparent -> white
    assert (np.asarray(results["grey16.png"].image) == 255).all()  # 65535 -> 255, not clipped
    grey = np.asarray(results["grey.jpg"].image)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert results["one.png"].image.getpixel((0, 0)) == (10, 20, 30)
    assert results["float.tif"].image.size == (30, 20)


# ----------------------------------------------------------------------------------------------
# Bad images: fuzzed bytes, odd formats, misleading names


def png(width: int, height: int, depth: int, color: int, raw: bytes) -> bytes:
    """A PNG written by hand: for 16-bit colour, and for headers that lie about the size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def png16(pixels: np.ndarray) -> bytes:
    height, width, channels = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    return png(width, height, 16, {3: 2, 4: 6}[channels], raw)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
SEEDS = {fmt: encoded(PHOTO, fmt) for fmt in ("JPEG", "PNG", "BMP", "WEBP", "TIFF")}


def check_opened(path: Path) -> ui.OpenedImage:
    opened = ui.open_image(path)
    if opened.image is None:
        assert isinstance(opened.reason, str) and opened.reason
    else:
        assert opened.reason is None and opened.image.mode == "RGB"
        assert min(opened.image.size) >= 1
    return opened


FUZZ = settings(max_examples=50, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=3000), name=st.sampled_from(["x.jpg", "x.png", "x.tif"]))
def test_open_image_never_raises_on_random_bytes(data, name, tmp_path):
    path = tmp_path / name
    path.write_bytes(data)
    check_opened(path)


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # PIL's, on cut TIFF headers
@FUZZ
@given(fmt=st.sampled_from(sorted(SEEDS)), cut=st.floats(0.05, 1.0),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                      max_size=12))
def test_open_image_never_raises_on_mutated_images(fmt, cut, flips, tmp_path):
    data = bytearray(SEEDS[fmt][:max(1, int(len(SEEDS[fmt]) * cut))])
    for where, value in flips:
        data[int(where * len(data))] ^= value
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(bytes(data))
    check_opened(path)


def odd_files(folder: Path) -> dict[str, str | None]:
    """Cases ``odd_folder`` does not cover -> None if loaded, else part of the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    grey16 = np.zeros((4, 5, 3), np.uint16)
    grey16[..., 0], grey16[..., 1] = 257 * 100, 65535
    alpha16 = np.zeros((4, 5, 4), np.uint16)  # transparent red: white on the page
    alpha16[..., 0] = 65535
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": stored 40x20, shown 20x40
    files = {
        "rgb16.png": (png16(grey16), None),
        "rgba16.png": (png16(alpha16), None),
        "png_named.jpg": (SEEDS["PNG"], None),
        "text_named.png": (b"just some notes, not pixels\n" * 10, "cannot decode"),
        "truncated.png": (SEEDS["PNG"][: len(SEEDS["PNG"]) // 2], "cannot decode"),
        "cmyk.tif": (encoded(Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "TIFF"), None),
        "rotated.jpg": (encoded(Image.new("RGB", (40, 20)), "JPEG", exif=exif), None),
        "frames.tif": (encoded(Image.new("RGB", (6, 4), (0, 0, 255)), "TIFF", save_all=True,
                               append_images=[Image.new("RGB", (6, 4), (255, 0, 0))]), None),
        "claims_huge.png": (png(100_000, 100_000, 8, 2, b"\0" * 10), "decompression bomb"),
        "claims_big.png": (png(7000, 7000, 8, 2, b"\0" * 10), "too large"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "folder.jpg").mkdir()  # a folder with an image's name: not listed
    return {name: reason for name, (_, reason) in files.items()} | {
        "dangling.jpg": "cannot decode"}


def test_odd_images_are_loaded_or_refused_with_a_reason(tmp_path):
    expected = odd_files(tmp_path)
    for name, reason in expected.items():
        opened = check_opened(tmp_path / name)
        if reason is None:
            assert opened.image is not None, (name, opened.reason)
        else:
            assert opened.image is None and reason in opened.reason, (name, opened.reason)
    pixel = {name: ui.open_image(tmp_path / name).image.getpixel((0, 0))
             for name in ("rgb16.png", "rgba16.png", "cmyk.tif", "frames.tif")}
    assert pixel == {"rgb16.png": (100, 255, 0), "rgba16.png": (255, 255, 255),
                     "cmyk.tif": (255, 0, 0), "frames.tif": (0, 0, 255)}
    assert ui.open_image(tmp_path / "rotated.jpg").image.size == (20, 40)
