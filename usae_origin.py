"""Where a run's USAE comes from: trained here (its history), or given with ``--checkpoint``.

A USAE given to a run (``run_all.sh --checkpoint PATH``) is imported instead of trained.

``PATH`` is a checkpoint of this library (a ``.safetensors`` file, or a folder written by
``usae_checkpoint.save``) or the authors' release (its YAML; the ``.pth`` files are found as
``usae_official.import_official`` finds them). :func:`describe` reads what a run must know before
any work (kind, model names, widths, n, k) without reading weights; :func:`run_names` maps the
checkpoint's model names onto the run's (the release's through ``usae_official.OFFICIAL_NAMES``);
:func:`install` imports it once, renamed, as ``<out>/usae.safetensors``, where every notebook's
``usae_pipeline.load_usae`` finds it.

An installed USAE keeps the checkpoint's n, k and standardisation, and its file has no training
history (no ``training`` section in its header): that is how the notebooks and ``metrics.json``
tell a USAE imported, not trained here (:func:`trained_here`, :func:`training_summary`).
The functions take a ``usae_pipeline.Experiment`` as ``exp`` (this module cannot import it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

import usae_checkpoint as ckpt
import usae_core as core
import usae_official as official

KINDS = {"checkpoint": "this library's checkpoint", "official": "the authors' release (YAML)"}


class Given(NamedTuple):
    """What a checkpoint holds, read without its weights."""

    path: Path
    kind: str  # a key of KINDS
    dims: dict[str, int]  # the checkpoint's own model names -> widths
    n_concepts: int
    k: int


def describe(path: str | os.PathLike) -> Given:
    """The kind, model names, widths, n and k of the checkpoint at ``path``; raises
    ``ValueError`` naming the problem and the fix when it is missing, of no known kind or
    unreadable (for the release, also when a ``.pth`` file is not found)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"checkpoint must be a path, got {path!r}.")
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist: pass a .safetensors file or a "
                         "folder written by usae_checkpoint.save, or the authors' "
                         "config_dino_siglip_vit.yaml with its .pth files.")
    if path.suffix.lower() in (".yaml", ".yml"):
        dims, n, k, _ = official.release_contents(path)  # CheckpointError is a ValueError
        return Given(path, "official", dims, n, k)
    if path.suffix == ".safetensors" or (path.is_dir() and (path / ckpt.WEIGHTS_NAME).is_file()):
        config = ckpt.read_header(path)["model"]
        return Given(path, "checkpoint", dict(config["dims"]), config["n_concepts"], config["k"])
    raise ValueError(f"checkpoint {path} is of no known kind: pass a .safetensors file or a "
                     f"folder holding {ckpt.WEIGHTS_NAME} (usae_checkpoint.save), or the "
                     "authors' release as its YAML (.yaml or .yml; the .pth files beside it or "
                     "where it says).")


def take_sizes(exp) -> None:
    """With ``exp.checkpoint``: make its path absolute (the notebooks run in ``notebooks/``) and
    fill the unset ``n_concepts`` and ``k`` with the checkpoint's (``Experiment.__post_init__``)."""
    if exp.checkpoint and isinstance(exp.checkpoint, (str, os.PathLike)):
        exp.checkpoint = str(Path(exp.checkpoint).expanduser().absolute())
        given = describe(exp.checkpoint)
        exp.n_concepts, exp.k = exp.n_concepts or given.n_concepts, exp.k or given.k


def check_experiment(exp) -> None:
    """``Experiment.validate``'s checks of ``checkpoint``: a path of a known kind, whose n and k
    are the run's and whose models map onto the run's backbones."""
    if not isinstance(exp.checkpoint, (str, os.PathLike)):
        raise ValueError(f"checkpoint must be a path, got {exp.checkpoint!r}.")
    if not exp.checkpoint:
        return
    given = describe(exp.checkpoint)
    for key in ("n_concepts", "k"):
        if getattr(exp, key) != getattr(given, key):
            raise ValueError(f"{key}={getattr(exp, key)} differs from the checkpoint's "
                             f"{key}={getattr(given, key)} ({given.path}): leave "
                             f"--{key.replace('_', '-')} out, it follows the checkpoint.")
    run_names(given, exp.backbones, exp.names)


def run_names(given: Given, backbones: Sequence[str], keys: Sequence[str]) -> dict[str, str]:
    """The checkpoint's model name -> the run's (``keys[i]`` is the model name of
    ``backbones[i]``). Our checkpoints must use the run's names; the release's names map through
    ``usae_official.OFFICIAL_NAMES`` onto the backbone of that architecture (``random:`` or
    not). Raises ``ValueError`` when a model of either side has no partner."""
    if given.kind == "checkpoint":
        if set(given.dims) != set(keys):
            raise ValueError(f"the checkpoint {given.path} holds the models {list(given.dims)}, "
                             f"but this run's are {list(keys)}: pass the backbones it was "
                             "trained on (--backbones), or a checkpoint of these models.")
        return {name: name for name in given.dims}
    by_base = {name.removeprefix("random:"): key for name, key in zip(backbones, keys)}
    names = {}
    for name in given.dims:
        base = official.OFFICIAL_NAMES.get(name)
        if base is None or base not in by_base:
            known = "; ".join(f"{o} -> {b}" for o, b in official.OFFICIAL_NAMES.items())
            paper = ",".join(official.OFFICIAL_NAMES.values())
            raise ValueError(f"the release's model {name!r} ({given.path}) has no backbone in "
                             f"this run ({list(backbones)}); the release's names map so: "
                             f"{known}. Run with --backbones {paper} (the paper preset's).")
        names[name] = by_base[base]
    missing = [key for key in keys if key not in names.values()]
    if missing:
        raise ValueError(f"the backbones {missing} of this run have no model in the release "
                         f"{given.path} (it holds {list(given.dims)}): leave them out of "
                         "--backbones.")
    return names


def check_widths(given: Given, names: dict[str, str], widths: dict[str, int]) -> None:
    """Refuse a checkpoint whose model widths differ from the backbones' (``widths``: the run's
    model name -> token width), naming the model and both widths."""
    for name, key in names.items():
        if given.dims[name] != widths[key]:
            raise ValueError(f"model {name!r} of the checkpoint {given.path} has width "
                             f"{given.dims[name]}, but the backbone {key!r} gives tokens of "
                             f"width {widths[key]}: the checkpoint was trained on other "
                             "activations; pass the backbones it was trained on (--backbones).")


def renamed(model: core.USAE, names: dict[str, str], order: Sequence[str]) -> core.USAE:
    """``model`` with its models renamed by ``names`` and listed in ``order``; same weights."""
    dims = {names[old]: width for old, width in model.dims.items()}
    copy = core.USAE({key: dims[key] for key in order}, model.n_concepts, model.k)
    back = {new: old for old, new in names.items()}
    state = {}
    for key in copy.state_dict():
        if key.startswith("pairs."):
            _, new, rest = key.split(".", 2)
            state[key] = model.state_dict()[f"pairs.{back[new]}.{rest}"]
        else:
            state[key] = model.state_dict()[key]
    copy.load_state_dict(state, strict=True)
    return copy.eval()


def _same(a: core.USAE, b: core.USAE) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return a.config() == b.config() and sa.keys() == sb.keys() and \
        all(torch.equal(sa[key].cpu(), sb[key].cpu()) for key in sa)


def trained_here(path: str | os.PathLike) -> bool:
    """Whether the USAE at ``path`` was trained by this library (its file keeps the training
    history) rather than imported with ``--checkpoint``."""
    return "training" in ckpt.read_header(path)


def install(checkpoint: str | os.PathLike, backbones: Sequence[str], keys: Sequence[str],
            widths: dict[str, int], target: str | os.PathLike,
            device: str = "cpu") -> core.USAE:
    """Import the USAE at ``checkpoint`` once, renamed to the run's model names ``keys`` (those
    of ``backbones``), into ``target``; return it in eval mode on ``device``.

    Its n, k and standardisation are the checkpoint's; no training step runs. A ``target`` that
    already holds the same model is reused as it is. One that holds a USAE trained here, or
    another imported one, is refused rather than replaced, so that one output folder never
    mixes two models' results: pass another ``--out`` or delete the file.
    """
    given = describe(checkpoint)
    names = run_names(given, backbones, keys)
    check_widths(given, names, widths)
    model = official.import_official(given.path) if given.kind == "official" else \
        ckpt.load(given.path)
    model = renamed(model, names, keys)
    target = Path(target)
    if target.is_file():
        if trained_here(target):
            raise ValueError(f"{target} holds a USAE trained by an earlier run of this folder "
                             f"without --checkpoint; the given {given.path} would replace it "
                             "and mix two models' results: pass another --out, or delete "
                             f"{target} (and the folder's codes_*.safetensors) first.")
        existing = ckpt.load(target)
        if not _same(existing, model):
            raise ValueError(f"{target} holds another imported USAE than {given.path}: pass "
                             f"another --out, or delete {target} (and the folder's "
                             "codes_*.safetensors) first.")
        return existing.to(device).eval()  # re-run: the same model, imported before
    target.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save(model, target)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# What the run's checkpoints say about training


def training_history(path: str | os.PathLike) -> list[dict]:
    """The history rows saved with a training checkpoint (one per log interval); ``[]`` for an
    imported USAE."""
    return ckpt.read_header(path).get("training", {}).get("history", [])


def dictionary_movement(exp) -> dict:
    """``metrics.json``'s ``dictionary_cosine_to_init``: per model, the median over rows of the
    cosine between each final dictionary row and its initial row, for the USAE and for each
    independent SAE (1: training did not move it). ``None`` for an imported USAE: its initial
    rows are not known here."""
    history = training_history(exp.folder / "usae.safetensors")
    usae = history[-1]["dictionary_cosine_to_init"] if history else None
    independent = {name: training_history(exp.folder / f"sae_{name}.safetensors")[-1]
                   ["dictionary_cosine_to_init"][name] for name in exp.names}
    return {"dictionary_cosine_to_init": usae,
            "independent_dictionary_cosine_to_init": independent}


def training_summary(exp) -> dict:
    """``metrics.json``'s account of the run's USAE: ``usae_trained_here``, ``usae_checkpoint``
    (the imported path, or None), ``train_steps`` (0 when imported), ``training_final`` (the
    last history row: training-batch R², dead fractions, loss; None when imported) and
    :func:`dictionary_movement`'s two entries."""
    header = ckpt.read_header(exp.folder / "usae.safetensors")
    history = header.get("training", {}).get("history", [])
    return {"usae_trained_here": "training" in header, "usae_checkpoint": exp.checkpoint or None,
            "train_steps": header["training"]["step"] if "training" in header else 0,
            "training_final": {key: history[-1][key] for key in ("r2", "dead_fraction", "loss")}
            if history else None, **dictionary_movement(exp)}
