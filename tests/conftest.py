"""Shared pytest fixtures and helpers: the shared photo folder, a fake backbone, position-coded
and odd images, small caches, and the faults the reliability tests inject (storage failures,
SIGKILL, planted pickles, bad paths)."""
from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import subprocess
import tempfile
import time
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


def write_images(folder: Path, n: int, broken: int | None = None) -> Path:
    """Images ``img_000.png``... with identity 1..n; ``broken``: that one is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coded_image(i + 1).save(folder / f"img_{i:03d}.png")
    if broken is not None:  # one bad file inside the run: it must be skipped the same way
        (folder / f"img_{broken:03d}.png").write_bytes(b"not an image")
    return folder


@pytest.fixture
def write_coded_images():
    """Factory ``(folder, n) -> folder``: images ``img_000.png``... with identity 1..n."""
    return write_images


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    """Valid but unusual images, and files that are not images at all (:data:`BAD`)."""
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


BAD = {"truncated.jpg", "random.jpg", "empty.jpg", "huge.png"}  # odd_folder's unusable files


# ---- small caches built with the fake backbones, and their files --------------------------------


def fake_pair() -> list[FakeBackbone]:
    return [FakeBackbone("alpha", 8, 1), FakeBackbone("beta", 12, 2)]


def build_pair(images, out, **kwargs):
    """``usae_cache.build_cache`` with :func:`fake_pair`, 60 tokens per image, quietly."""
    import usae_cache

    kwargs = {"batch_size": 2, "tokens_per_image": 60, "progress": False, "workers": 1,
              **kwargs}
    return usae_cache.build_cache(fake_pair(), images, out, **kwargs)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """24 coded images, the sixth of them broken."""
    return write_images(tmp_path_factory.mktemp("images"), 24, broken=5)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    """A complete 6-image cache with positions.npy; tests corrupt copies of it."""
    root = tmp_path_factory.mktemp("small")
    folder = root / "cache"
    build_pair(write_images(root / "images", 6), folder, batch_size=4)
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a folder, hidden ones included (a leftover temporary must show)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, count: int = 10) -> None:
    path.write_bytes(path.read_bytes()[:-count])


# ---- faults: storage failures, SIGKILL, planted pickles, bad paths -------------------------------
#
# Root runs the tests, and chmod does not stop root, so storage faults are simulated by making
# the system calls fail (monkeypatch), as a full or read-only disk makes them fail.

ROOT = Path(__file__).resolve().parents[1]


def fail_on(monkeypatch, module, name, code, when=lambda *args, **kwargs: True, after=0):
    """Make ``module.name`` raise OSError(code) when ``when(...)``, after ``after`` good calls."""
    original, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        if when(*args, **kwargs):
            calls.append(args)
            if len(calls) > after:
                raise OSError(code, os.strerror(code))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def kill_when(command: list[str], ready, delay: float, timeout: float = 120) -> int:
    """Start ``command``; once ``ready()`` is true wait ``delay`` seconds, then SIGKILL it.

    Returns the exit status. Fails (and never hangs) if the process ends or stalls first.
    """
    with tempfile.TemporaryFile() as output:  # a file, not a pipe that could fill and block
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if process.poll() is not None:
                    output.seek(0)
                    pytest.fail(f"exited ({process.returncode}) before it could be killed:\n"
                                + output.read().decode()[-3000:])
                if time.monotonic() > deadline:
                    pytest.fail(f"no progress within {timeout} s")
                time.sleep(0.02)
            time.sleep(delay)
        finally:
            process.kill()
            process.wait(timeout=30)
    return process.returncode


def run_to_end(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


class Payload:
    """Unpickling this touches a marker file: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def payload(tmp_path):
    """(marker, malicious pickle bytes); the payload is shown to be live before use."""
    marker = tmp_path / "PWNED"
    data = pickle.dumps(Payload(marker), protocol=4)
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()
    return marker, data


@pytest.fixture(scope="module")
def odd_paths(tmp_path_factory) -> dict[str, Path]:
    """A file, an empty folder, a missing path and a folder of images without ``train/``."""
    root = tmp_path_factory.mktemp("paths")
    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "no_train").mkdir()
    coded_image(1).save(root / "no_train" / "x.png")
    return {"file": root / "a_file", "empty": root / "empty", "missing": root / "missing",
            "no_train": root / "no_train"}


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


# ---- two-process (gloo) runs: the environment torchrun sets, one process per rank ------------


def start_ranks(argv: list[str], logs: Path, world: int = 2) -> list[subprocess.Popen]:
    """``python *argv`` once per rank, as torchrun would start them on this machine (gloo on the
    CPU, a free port); rank r writes its output to ``logs/rank<r>.log``."""
    import socket
    import sys

    logs.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(world), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, *argv], cwd=ROOT, stderr=subprocess.STDOUT,
                             stdout=(logs / f"rank{r}.log").open("w"),
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(world)]


def stop_ranks(processes: list[subprocess.Popen]) -> None:
    for process in processes:  # a rank left waiting in a collective would hang for ever
        process.kill()
        process.wait()


def run_ranks(argv: list[str], logs: Path, world: int = 2, limit: float = 120) -> None:
    """:func:`start_ranks`, then wait for every rank (at most ``limit`` s); fails the test with
    the tail of each rank's log unless every rank exited with 0."""
    processes = start_ranks(argv, logs, world)
    deadline = time.monotonic() + limit
    try:
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_ranks(processes)
    report = "\n".join(f"--- rank {r} (exit {p.returncode}):\n"
                       f"{(logs / f'rank{r}.log').read_text()[-3000:]}"
                       for r, p in enumerate(processes))
    assert all(p.returncode == 0 for p in processes), report


# ---- planted sparse codes: the explorer's, the heatmaps' and the widgets' tests ----------------

GRID, T, N_CONCEPTS, K, N_IMAGES = 14, 196, 16, 3, 6
NAMES = ("a", "b", "c")
# (concept, value, [(model, image, row, col), ...]): a universal concept (2), a concept of
# models a and b (7), one unique to model a (5). Background noise uses concepts 8..15 only.
PLANTS = [
    (2, 4.0, [(m, 1, 3, 5) for m in NAMES] + [(m, 4, 10, 2) for m in NAMES]),
    (7, 3.0, [("a", 1, 0, 0), ("b", 1, 0, 0)]),
    (5, 3.0, [("a", 2, 7, 7)]),
]


def to_sparse(dense: torch.Tensor):
    """Top-k of a dense ``tokens x n`` matrix; zero slots get distinct unused concepts."""
    values, indices = torch.topk(dense, K, dim=1)
    import usae_analysis as analysis

    return analysis.SparseCodes(indices.to(torch.int16), values.half(), dense.shape[1])


def planted_dense(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dense = {}
    for name in NAMES:
        z = torch.zeros(N_IMAGES * T, N_CONCEPTS)
        rows = torch.randint(0, N_IMAGES * T, (100,), generator=generator)
        concepts = torch.randint(8, N_CONCEPTS, (100,), generator=generator)
        z[rows, concepts] = 0.05 + 0.25 * torch.rand(100, generator=generator)
        dense[name] = z
    for concept, value, places in PLANTS:
        for model, image, row, col in places:
            dense[model][image * T + row * GRID + col, concept] = value
    # fp16 rounding happens in the sparse form: keep the dense reference identical to it
    return {n: to_sparse(z).dense() for n, z in dense.items()}


@pytest.fixture(scope="module")
def dense():
    return planted_dense()


@pytest.fixture(scope="module")
def codes(dense):
    return {n: to_sparse(z) for n, z in dense.items()}


def photo(i: int, size=(300, 200)) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def photos():
    return [photo(i) for i in range(N_IMAGES)]


@pytest.fixture
def explorer(codes, photos):
    import usae_analysis as analysis
    import usae_explorer

    return usae_explorer.ConceptExplorer(codes, photos, analysis.concept_statistics(codes),
                                         top_n=3)


def small_usae():
    """A USAE over the planted models with channel-centred standardisation."""
    import usae_core as core

    model = core.USAE({"a": 8, "b": 6, "c": 5}, n_concepts=N_CONCEPTS, k=4, seed=0)
    generator = torch.Generator().manual_seed(3)
    sample = {n: torch.randn(64, d, generator=generator) * 2 + 1 for n, d in model.dims.items()}
    model.fit_standardization(sample, centre_channels=True)
    return model


# ---- the quick end-to-end run: one per session, shared by the notebook and browser tests ------


def run_quick(out: Path, seed: int = 0) -> subprocess.CompletedProcess:
    """``run_all.sh --quick --out out --seed seed`` with PYTHONHASHSEED=0, its output captured."""
    command = ["bash", str(ROOT / "run_all.sh"), "--quick", "--out", str(out), "--seed", str(seed)]
    return subprocess.run(command, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONHASHSEED": "0"})


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """(out, completed process) of one ``run_all.sh --quick`` run, made once per session."""
    out = tmp_path_factory.mktemp("quick")
    result = run_quick(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result
