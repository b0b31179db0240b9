"""Tests of usae_cache: image listing and decoding, the activation cache, the token loader."""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import usae_cache as uc

# ----------------------------------------------------------------------------------------------
# Helpers


def build(backbones, images, out, **kwargs):
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 2)
    return uc.build_cache(backbones, images, out, **kwargs)


def pair(make, seed_a=1, seed_b=2):
    return [make("alpha", 8, seed_a), make("beta", 12, seed_b)]


def read_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    """Valid but unusual images, and files that are not images at all."""
    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    photo.save(folder / "rgb.jpg", quality=90)
    photo.convert("L").save(folder / "grey.jpg")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out white
    rgba.save(folder / "rgba.png")
    photo.convert("LA").save(folder / "la.png")
    photo.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16)).save(folder / "grey16.png")
    Image.fromarray(rng.random((20, 30), dtype=np.float32)).save(folder / "float.tif")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "one.png")
    Image.new("RGB", (3, 5), (200, 100, 0)).save(folder / "tiny.bmp")
    # 10,000 x 10,000: cheap as a flat-colour JPEG (~1 MB), decoded by libjpeg at half size.
    Image.new("L", (10000, 10000), 128).save(folder / "huge.jpg", quality=50)
    Image.new("1", (10000, 10000)).save(folder / "huge.png")  # not a JPEG: refused
    good = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "random.jpg").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (folder / "empty.jpg").write_bytes(b"")
    return folder


BAD = {"truncated.jpg", "random.jpg", "empty.jpg", "huge.png"}


def identity_cache(tmp_path: Path, n_images: int = 30) -> uc.Cache:
    """A synthetic cache where row r of both models stores r in base 256 in columns 0..2."""
    folder = tmp_path / "ids"
    uc.make_synthetic_cache(folder, {"alpha": 4, "beta": 6}, n_images, stats_sample=10)
    for name in ("alpha", "beta"):
        array = np.load(folder / f"{name}.npy", mmap_mode="r+")
        rows = np.arange(len(array))
        array[:, 0], array[:, 1], array[:, 2] = rows % 256, rows // 256 % 256, rows // 65536
        array.flush()
        del array
    return uc.open_cache(folder)


def row_ids(tensor: torch.Tensor) -> np.ndarray:
    values = tensor[:, :3].double().numpy().round().astype(np.int64)
    return values[:, 0] + 256 * values[:, 1] + 65536 * values[:, 2]


# ----------------------------------------------------------------------------------------------
# Images


def test_list_images_layouts(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("n01440764_10026_tench.jpg", "n01484850_great_white_shark.JPEG", "cat.Png",
                 "notes.txt", ".hidden.jpg"):
        (flat / name).write_bytes(b"x")
    images = uc.list_images(flat)
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
    images = uc.list_images(classes)
    assert images.paths == ("bird/n01530575_1_brambling.TIF", "dog/a.jpg", "dog/more/b.webp")
    assert images.labels == ("bird", "dog", "dog")
    assert uc.list_images(classes).sha256() == images.sha256() != uc.list_images(flat).sha256()


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        uc.list_images(tmp_path / "nowhere")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image found"):
        uc.list_images(tmp_path)


def test_list_images_shared_photos(shared_data_dir):
    train = uc.list_images(shared_data_dir / "imagenet-200x5")
    assert len(train) == 1000 and len(set(train.labels)) == 200
    assert train.labels[0] == "person" and train.labels[-1] == "burrito"
    val = uc.list_images(shared_data_dir / "imagenet-1000x1")
    assert len(val) == 1000 and val.labels[:3] == ("tench", "goldfish", "great_white_shark")
    faces = uc.list_images(shared_data_dir / "faces")  # pairs.csv is not an image
    assert len(faces) == 64 and all(label == Path(p).stem for p, label in
                                    zip(faces.paths, faces.labels))


def test_default_images_falls_back_to_skimage(tmp_path, monkeypatch):
    monkeypatch.setenv("USAE_SHARED_DATA", str(tmp_path / "no-shared-data"))
    images = uc.default_images(tmp_path / "cache")
    assert len(images) == 14 and "astronaut" in images.labels
    assert images.root == (tmp_path / "cache" / "skimage-photos").resolve()
    first = images.absolute(0).stat().st_mtime_ns
    assert uc.default_images(tmp_path / "cache") == images  # written once
    assert images.absolute(0).stat().st_mtime_ns == first
    camera = uc.open_image(images.absolute(images.labels.index("camera"))).image
    assert camera.mode == "RGB"


def test_default_images_prefers_shared_photos(shared_data_dir, monkeypatch):
    monkeypatch.setenv("USAE_SHARED_DATA", str(shared_data_dir))
    assert uc.default_images().root == (shared_data_dir / "imagenet-200x5").resolve()


def test_open_image_odd_files(odd_folder):
    results = {p.name: uc.open_image(p) for p in sorted(odd_folder.iterdir())}
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
# Building a cache


def test_build_skips_bad_images_and_completes(odd_folder, tmp_path, make_fake_backbone):
    images = uc.list_images(odd_folder)
    cache = build(pair(make_fake_backbone), images, tmp_path / "c")
    skipped = cache.metadata["skipped"]
    assert skipped["count"] == len(BAD)
    assert {item["path"] for item in skipped["images"]} == BAD
    assert all(item["reason"] for item in skipped["images"])
    kept_names = {images.paths[i] for i in cache.kept_images}
    assert kept_names == set(images.paths) - BAD
    assert cache.n_tokens == len(kept_names) * 196
    for array in cache.arrays.values():
        assert np.isfinite(array).all()


def test_rows_are_aligned_across_models(tmp_path, make_fake_backbone, write_coded_images):
    images = uc.list_images(write_coded_images(tmp_path / "imgs", 7))
    for tokens in (None, 50):
        cache = build(pair(make_fake_backbone), images, tmp_path / f"c{tokens}",
                      tokens_per_image=tokens)
        a, b = (np.asarray(cache.arrays[n], dtype=np.float64) for n in ("alpha", "beta"))
        identity = np.array([1 + int(Path(p).stem[4:]) for p in images.paths])
        # channel 0 = grid position, channel 1 = image identity, in both models' rows
        assert (a[:, 0] == cache.position_of_row()).all()
        assert (b[:, 0] == cache.position_of_row()).all()
        assert (a[:, 1] == identity[cache.image_of_row()]).all()
        assert (b[:, 1] == identity[cache.image_of_row()]).all()
        assert not np.allclose(a[:, 3:8], b[:, 3:8])  # the models do differ elsewhere
        assert cache.n_tokens == 7 * (tokens or 196)


def test_token_subsample(tmp_path, make_fake_backbone, write_coded_images):
    images = uc.list_images(write_coded_images(tmp_path / "imgs", 6))
    widths = [8, 12]
    tokens = uc.tokens_per_image_for_budget(widths, len(images), budget_bytes=6 * 40 * 20 * 2)
    assert tokens == 40
    cache = build(pair(make_fake_backbone), images, tmp_path / "a", tokens_per_image=tokens)
    positions = cache.positions
    assert positions.shape == (6, 40)
    assert all(len(set(row)) == 40 and (np.diff(row) > 0).all() for row in positions)
    assert len({tuple(row) for row in positions}) == 6  # drawn per image
    assert cache.metadata["bytes_per_image"] == uc.cache_bytes_per_image(widths, 40) == 1600
    on_disk = sum(array.nbytes for array in cache.arrays.values())
    assert on_disk == 6 * 1600 <= 6 * 40 * 20 * 2
    same = build(pair(make_fake_backbone), images, tmp_path / "b", tokens_per_image=tokens)
    other = build(pair(make_fake_backbone), images, tmp_path / "c", tokens_per_image=tokens,
                  seed=1)
    assert (same.positions == positions).all()
    assert not (other.positions == positions).all()


def test_size_helpers():
    assert uc.cache_bytes_per_image([384, 768, 768], 196) == 752_640
    assert uc.tokens_per_image_for_budget([384, 768, 768], 100_000, 25e9) == 65
    assert uc.tokens_per_image_for_budget([384, 768, 768], 10, 1e12) == 196
    with pytest.raises(ValueError, match="cannot hold one token"):
        uc.tokens_per_image_for_budget([384, 768, 768], 100_000, 1e6)


def test_metadata_contents(tmp_path, make_fake_backbone, write_coded_images):
    images = uc.list_images(write_coded_images(tmp_path / "imgs", 3))
    backbones = pair(make_fake_backbone)
    cache = build(backbones, images, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta == cache.metadata and meta["complete"] is True
    assert meta["format"] == uc.CACHE_FORMAT and meta["grid"] == 14
    assert meta["tokens_per_image"] == 196 and meta["n_tokens"] == 3 * 196
    assert meta["bytes_per_image"] == 2 * 196 * 20
    assert meta["images"]["paths"] == list(images.paths)
    assert meta["images"]["sha256"] == images.sha256()
    for model, backbone in zip(meta["models"], backbones):
        assert model["describe"] == json.loads(json.dumps(backbone.describe()))
        assert model["preprocessing"] == json.loads(
            json.dumps(dataclasses.asdict(backbone.preprocessing)))
        assert model["layer"] == "conv16" and model["width"] == backbone.width
    assert not (tmp_path / "c" / "progress.json").exists()


def test_standardization_matches_numpy(tmp_path, make_fake_backbone, write_coded_images):
    images = uc.list_images(write_coded_images(tmp_path / "imgs", 10))
    for stats_sample in (4, 1000):
        cache = build(pair(make_fake_backbone), images, tmp_path / f"c{stats_sample}",
                      stats_sample=stats_sample, tokens_per_image=30)
        sample = cache.metadata["standardization"]["sample_images"]
        assert len(sample) == min(stats_sample, 10)
        rows = np.isin(cache.image_of_row(), sample)
        for name, (mean, std) in cache.standardization.items():
            values = np.asarray(cache.arrays[name][rows], dtype=np.float64)
            assert mean == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
            assert std == pytest.approx(values.std(ddof=1), rel=1e-12)
        for name, means in uc.channel_means(cache).items():  # per-channel centring's means
            values = np.asarray(cache.arrays[name][rows], dtype=np.float64)
            np.testing.assert_allclose(means, values.mean(axis=0), rtol=1e-12, atol=1e-12)


def test_interrupted_build_resumes_byte_identical(tmp_path, make_fake_backbone,
                                                  write_coded_images):
    folder = write_coded_images(tmp_path / "imgs", 10)
    (folder / "img_004.png").write_bytes(b"not an image")  # a skip inside the run
    images = uc.list_images(folder)
    reference = tmp_path / "reference"
    build(pair(make_fake_backbone), images, reference, batch_size=3, tokens_per_image=60)

    class Crashing(make_fake_backbone):
        def forward(self, pixels):
            if self.calls == 2:  # third batch, after "alpha" already ran on it
                raise KeyboardInterrupt("simulated crash")
            return super().forward(pixels)

    resumed = tmp_path / "resumed"
    crashing = [make_fake_backbone("alpha", 8, 1), Crashing("beta", 12, 2)]
    with pytest.raises(KeyboardInterrupt):
        build(crashing, images, resumed, batch_size=3, tokens_per_image=60)
    assert not (resumed / "cache.json").exists()
    assert json.loads((resumed / "progress.json").read_text())["images_done"] == 6
    with pytest.raises(FileNotFoundError, match="unfinished.*resume"):
        uc.open_cache(resumed)

    backbones = pair(make_fake_backbone)
    build(backbones, images, resumed, batch_size=3, tokens_per_image=60)
    assert [bb.calls for bb in backbones] == [2, 2]  # only images 6..9 were computed
    assert read_bytes(resumed) == read_bytes(reference)


def test_non_finite_activations_skip_the_image_for_every_model(tmp_path, make_fake_backbone,
                                                               write_coded_images):
    class NaNForImage3(make_fake_backbone):
        def forward(self, pixels):
            out = super().forward(pixels)
            out[out[:, 0, 1] == 3] = float("nan")  # channel 1 holds the image identity
            return out

    images = uc.list_images(write_coded_images(tmp_path / "imgs", 5))
    cache = build([make_fake_backbone("alpha", 8, 1), NaNForImage3("beta", 12, 2)], images,
                  tmp_path / "c", tokens_per_image=10)
    assert cache.metadata["skipped"]["images"] == [
        {"index": 2, "path": "img_002.png", "reason": "activations not finite in float16 (NaN "
                                                      "or beyond +-65504) for some model"}]
    assert list(cache.kept_images) == [0, 1, 3, 4] and cache.n_tokens == 40
    assert (np.asarray(cache.arrays["alpha"][:, 1]) == np.repeat([1, 2, 4, 5], 10)).all()
    assert (np.asarray(cache.arrays["beta"][:, 1]) == np.repeat([1, 2, 4, 5], 10)).all()


def test_bad_arguments(tmp_path, make_fake_backbone, write_coded_images):
    images = uc.list_images(write_coded_images(tmp_path / "imgs", 2))

    class WrongShape(make_fake_backbone):
        def forward(self, pixels):
            return super().forward(pixels)[:, 1:]  # e.g. a CLS token dropped twice

    with pytest.raises(ValueError, match="distinct"):
        build([make_fake_backbone("a", 4), make_fake_backbone("a", 5)], images, tmp_path / "a")
    with pytest.raises(ValueError, match="tokens_per_image"):
        build(pair(make_fake_backbone), images, tmp_path / "b", tokens_per_image=197)
    with pytest.raises(ValueError, match="returned shape"):
        build([WrongShape("a", 4)], images, tmp_path / "c")


def test_mismatch_is_refused_and_rebuild_works(tmp_path, make_fake_backbone,
                                               write_coded_images):
    images = uc.list_images(write_coded_images(tmp_path / "imgs", 5))
    out = tmp_path / "c"
    build(pair(make_fake_backbone), images, out, tokens_per_image=20)

    again = pair(make_fake_backbone)
    build(again, images, out, tokens_per_image=20)  # same request: opened, nothing computed
    assert [bb.calls for bb in again] == [0, 0]

    with pytest.raises(uc.CacheMismatchError, match=r"(?s)tokens_per_image: cached 20, "
                                                    r"requested 196.*rebuild=True"):
        build(pair(make_fake_backbone), images, out)
    with pytest.raises(uc.CacheMismatchError, match=r"model 'beta': describe"):
        build(pair(make_fake_backbone, seed_b=3), images, out, tokens_per_image=20)
    with pytest.raises(uc.CacheMismatchError, match="models: cached"):
        build([make_fake_backbone("alpha", 8, 1)], images, out, tokens_per_image=20)
    subset = uc.ImageSet(images.root, images.paths[:4], images.labels[:4])
    with pytest.raises(uc.CacheMismatchError, match="image list"):
        build(pair(make_fake_backbone), subset, out, tokens_per_image=20)

    cache = build(pair(make_fake_backbone), subset, out, rebuild=True)
    assert cache.tokens_per_image == 196 and len(cache.kept_images) == 4
    assert uc.open_cache(out).n_tokens == 4 * 196

    class Crashing(make_fake_backbone):
        def forward(self, pixels):
            raise KeyboardInterrupt

    unfinished = tmp_path / "unfinished"
    with pytest.raises(KeyboardInterrupt):
        build([Crashing("alpha", 8, 1)], images, unfinished)
    with pytest.raises(uc.CacheMismatchError, match="unfinished cache"):
        build([make_fake_backbone("alpha", 8, 1)], images, unfinished, tokens_per_image=9)
    assert build([make_fake_backbone("alpha", 8, 1)], images, unfinished,
                 tokens_per_image=9, rebuild=True).n_tokens == 5 * 9
    assert sorted(p.name for p in unfinished.iterdir()) == [
        "alpha.npy", "cache.json", "kept_images.npy", "positions.npy"]


def test_real_photos(shared_data_dir, tmp_path, make_fake_backbone):
    listed = uc.list_images(shared_data_dir / "imagenet-200x5")
    images = uc.ImageSet(listed.root, listed.paths[::125], listed.labels[::125])
    cache = build(pair(make_fake_backbone), images, tmp_path / "c", tokens_per_image=64)
    assert cache.metadata["skipped"]["count"] == 0 and cache.n_tokens == 8 * 64
    for mean, std in cache.standardization.values():
        assert np.isfinite(mean) and std > 0


# ----------------------------------------------------------------------------------------------
# Loader


def take(loader, count, start=0):
    return list(itertools.islice(loader.iter_from(start), count))


def test_loader_aligned_and_seeded(tmp_path):
    cache = identity_cache(tmp_path)
    loader = uc.TokenLoader(cache, batch_size=500, seed=3, chunk_rows=64, buffer_chunks=4)
    batches = take(loader, 30)
    for batch in batches:
        assert set(batch) == {"alpha", "beta"} and batch["alpha"].dtype == torch.float32
        assert batch["alpha"].shape == (500, 4) and batch["beta"].shape == (500, 6)
        assert (row_ids(batch["alpha"]) == row_ids(batch["beta"])).all()
    again = take(uc.TokenLoader(cache, batch_size=500, seed=3, chunk_rows=64, buffer_chunks=4,
                                prefetch=False), 30)
    assert all(torch.equal(x[n], y[n]) for x, y in zip(batches, again) for n in x)
    other = take(uc.TokenLoader(cache, batch_size=500, seed=4, chunk_rows=64,
                                buffer_chunks=4), 3)
    assert not torch.equal(other[0]["alpha"], batches[0]["alpha"])


# 5,880 rows: the batch divides them, does not, is larger than an epoch
@pytest.mark.parametrize("batch_size", [490, 512, 6000])
def test_loader_epochs_cover_every_row_once(tmp_path, batch_size):
    cache = identity_cache(tmp_path)
    n = cache.n_tokens
    loader = uc.TokenLoader(cache, batch_size=batch_size, chunk_rows=100, buffer_chunks=5)
    batches = take(loader, -(-3 * n // batch_size))
    stream = np.concatenate([row_ids(b["alpha"]) for b in batches])
    epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert (np.sort(epoch) == np.arange(n)).all()
    assert not (epochs[0] == epochs[1]).all()
    assert len(iter(loader).__next__()["alpha"]) == batch_size


def test_iter_from_matches_fresh_iteration(tmp_path):
    cache = identity_cache(tmp_path)
    kwargs = dict(batch_size=300, seed=5, chunk_rows=64, buffer_chunks=3)
    fresh = take(uc.TokenLoader(cache, **kwargs), 45)  # ~2.3 epochs
    for step in (0, 1, 7, 19, 20, 40):
        loader = uc.TokenLoader(cache, **kwargs)
        resumed = take(loader, 5, start=step)
        for x, y in zip(resumed, fresh[step:step + 5]):
            assert all(torch.equal(x[n], y[n]) for n in x)
    # Seeking far ahead reads only the buffers it serves (plus the one read ahead).
    loader = uc.TokenLoader(cache, **kwargs)
    next(loader.iter_from(10_000))
    assert loader.rows_read <= 2 * 64 * 3 * 2


class RecordingArray:
    """Wraps a memmap: allows only row slices, records their sizes; no whole-array access."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None, key
        start, stop, _ = key.indices(self.shape[0])
        self.reads.append(stop - start)
        return self.array[key]


def test_loader_memory_is_bounded(tmp_path):
    cache = identity_cache(tmp_path)
    recorded = {name: RecordingArray(array) for name, array in cache.arrays.items()}
    wrapped = dataclasses.replace(cache, arrays=recorded)
    loader = uc.TokenLoader(wrapped, batch_size=200, chunk_rows=50, buffer_chunks=4)
    batches = take(loader, 10)  # 2,000 rows served
    for array in recorded.values():
        assert max(array.reads) <= 50
        # served rows, plus at most one buffer being served and one read ahead
        assert sum(array.reads) <= 2000 + 2 * 50 * 4
    assert loader.largest_read <= 50 and len(batches) == 10


def test_loader_standardize_and_validation(tmp_path, make_fake_backbone, write_coded_images):
    images = uc.list_images(write_coded_images(tmp_path / "imgs", 4))
    cache = build(pair(make_fake_backbone), images, tmp_path / "c")
    raw = next(iter(uc.TokenLoader(cache, batch_size=64, seed=1)))
    scaled = next(iter(uc.TokenLoader(tmp_path / "c", batch_size=64, seed=1, standardize=True)))
    for name, (mean, std) in cache.standardization.items():
        assert torch.allclose(scaled[name], (raw[name] - mean) / (std + 1e-5))
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            uc.TokenLoader(cache, batch_size=bad)
    with pytest.raises(ValueError, match="step"):
        next(uc.TokenLoader(cache, batch_size=8).iter_from(-1))
