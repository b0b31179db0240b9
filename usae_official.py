"""The authors' released USAE (DINOv2 / SigLIP / ViT, epoch 29), read into a ``usae_core.USAE``.

The release is ``checkpoints/config_dino_siglip_vit.yaml`` (names, widths, scalar standardisation,
``top_k``, ``exp_factor``) and one ``uni_<model>_checkpoint_29.pth`` per model: a training
checkpoint of overcomplete's TopKSAE (``encoder_module: mlp_bn_1``). The ``.pth`` files are
pickles; they are read weights-only, so no code in them can run. ``python usae_official.py
CONFIG_YAML --out PATH`` converts them once into a checkpoint of this library.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Mapping

import torch
import yaml
from torch import Tensor

import usae_checks as checks
import usae_core as core
from usae_checkpoint import CheckpointError, save

# The authors' release: checkpoints/config_dino_siglip_vit.yaml and uni_<model>_checkpoint_29.pth,
# one training checkpoint of overcomplete's TopKSAE (encoder_module "mlp_bn_1") per model.

# Their state-dict keys -> ours within a ModelPair: final_block is Linear(d, n), BatchNorm1d(n).
OFFICIAL_KEYS = {"encoder.final_block.0.weight": "linear.weight",
                 "encoder.final_block.0.bias": "linear.bias",
                 "encoder.final_block.1.weight": "batch_norm.weight",
                 "encoder.final_block.1.bias": "batch_norm.bias",
                 "encoder.final_block.1.running_mean": "batch_norm.running_mean",
                 "encoder.final_block.1.running_var": "batch_norm.running_var",
                 "encoder.final_block.1.num_batches_tracked": "batch_norm.num_batches_tracked",
                 "dictionary._weights": "raw_dictionary"}
_RELEASE = "the authors' checkpoints/config_dino_siglip_vit.yaml"
# The release's model names -> the names of the same architectures in usae_backbones (the paper
# preset's backbones): a run given the release (run_all.sh --checkpoint) renames its models so.
OFFICIAL_NAMES = {"DinoV2": "dinov2", "SigLIP": "siglip", "ViT": "vit"}


def _number(section: Mapping, key: str, where: str, source: Path, *, integer: bool = False,
            positive: bool = True) -> float:
    """``section[key]``, checked: a finite number or an integer, > 0 when ``positive``."""
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or not math.isfinite(value) or (positive and value <= 0):
        kind = f"{'a positive' if positive else 'a finite'} {'integer' if integer else 'number'}"
        raise CheckpointError(f"{source}: {where}.{key} is {value!r}, but must be {kind}; "
                              f"fix it as in {_RELEASE}.")
    return value


def _official_config(path: Path) -> tuple[dict[str, int], int, int, dict, dict[str, str]]:
    """dims, n, k, standardisation and checkpoint paths (as written) of a released YAML."""
    if not path.is_file():
        raise CheckpointError(f"no YAML configuration at {path}: pass {_RELEASE}.")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        raise CheckpointError(f"{path} is not readable YAML ({error}): pass {_RELEASE}.") from error
    zoo = config.get("model_zoo") if isinstance(config, dict) else None
    if not isinstance(zoo, dict) or not zoo or not all(isinstance(e, dict) for e in zoo.values()):
        raise CheckpointError(f"{path} is not a configuration of the authors' release: it must be "
                              "a mapping whose 'model_zoo' maps each model name to its "
                              "input_shape, model_mean, model_std and checkpoint_path; pass "
                              f"{_RELEASE}.")
    sections = {key: config.get(key) or {} for key in ("global", "sae_params")}
    if not all(isinstance(section, dict) for section in sections.values()):
        raise CheckpointError(f"{path}: 'global' and 'sae_params' must be mappings, as in "
                              f"{_RELEASE}.")
    settings, sae = sections["global"], sections["sae_params"]
    # What this library's USAE cannot compute is refused, not approximated.
    for where, key, released in (("sae_params", "encoder_module", "mlp_bn_1"),
                                 ("sae_params", "dictionary_normalization", "l2"),
                                 ("global", "standardize", True), ("global", "divide_norm", False)):
        value = sections[where].get(key, released)
        if value != released:
            raise CheckpointError(f"{path}: {where}.{key} is {value!r}; this library computes "
                                  f"only the released USAE ({key}: {released}).")
    k = _number(sae, "top_k", "sae_params", path, integer=True)
    if "nb_components" in settings:
        n = _number(settings, "nb_components", "global", path, integer=True)
    else:  # as overcomplete's load_model_zoo
        n = int(_number(settings, "exp_factor", "global", path)
                * _number(settings, "input_shape", "global", path, integer=True))
    dims, stats, files = {}, {}, {}
    for name, entry in zoo.items():
        where = f"model_zoo.{name}"
        dims[name] = _number(entry, "input_shape", where, path, integer=True)
        if "model_mean" not in entry or "model_std" not in entry:
            raise CheckpointError(f"{path}: {where} has no model_mean / model_std, the scalar "
                                  "standardisation of the released model (the release's SigLIP: "
                                  f"-0.030537348 / 2.231515408); add them as in {_RELEASE}.")
        stats[name] = (float(_number(entry, "model_mean", where, path, positive=False)),
                       float(_number(entry, "model_std", where, path)))
        if not isinstance(entry.get("checkpoint_path"), str):
            raise CheckpointError(f"{path}: {where} has no checkpoint_path; add the file name, "
                                  f"e.g. checkpoint_path: uni_{name}_checkpoint_29.pth.")
        files[name] = entry["checkpoint_path"]
    try:
        checks.check_usae(dims, n, k)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from error
    return dims, n, k, stats, files


def _official_file(written: str, name: str, config: Path, folder: Path | None) -> Path:
    """The checkpoint of ``name``: its file name in ``folder``; else the path as written, relative
    to the YAML or not, or its name beside the YAML (the release's YAML has the authors' paths)."""
    written_path = Path(written).expanduser()
    candidates = [folder / written_path.name] if folder is not None else \
        [config.parent / written_path, written_path, config.parent / written_path.name]
    for candidate in dict.fromkeys(candidates):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"the checkpoint of {name} ({written}) is not at any of "
                          f"{[str(c) for c in dict.fromkeys(candidates)]}: download the "
                          "release's .pth files into one folder and pass it as "
                          "checkpoint_folder (command line: --checkpoints DIR), or fix "
                          f"model_zoo.{name}.checkpoint_path in {config}.")


def _official_state(path: Path, expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The released state dict in ``path``, checked against ``expected`` (key -> tensor)."""
    try:
        # weights_only: torch's restricted unpickler builds tensors and plain containers only
        # and refuses anything else, so code planted in the pickle is never run.
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged or foreign files raise anything from EOFError to KeyError
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        # torch's refusal of a pickled object says which one in its "WeightsUnpickler error" line
        reason = next((x for x in lines if "Unpickler error" in x), lines[0]).split(". Please")[0]
        raise CheckpointError(f"{path} cannot be read as a weights-only PyTorch checkpoint "
                              f"({type(error).__name__}: {reason[:200]}); it is truncated, not a "
                              "PyTorch file, or holds objects other than tensors (never run "
                              "here): download it again from the authors' release.") from error
    state = content.get("model_state_dict", content) if isinstance(content, dict) else content
    if not isinstance(state, dict) or set(state) != set(OFFICIAL_KEYS):
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} holds {found}, but a released model is a state dict (alone "
                              "or as the 'model_state_dict' of a training checkpoint) with the "
                              f"keys {list(OFFICIAL_KEYS)}: pass a uni_<model>_checkpoint_<epoch>"
                              ".pth of the authors' release.")
    for key, ours in OFFICIAL_KEYS.items():
        value = state[key]
        if not isinstance(value, Tensor) or value.shape != expected[ours].shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(f"{path}: {key} is {got}, but the YAML's width and n make it "
                                  f"{tuple(expected[ours].shape)}: the file belongs to another "
                                  "model or run; fix the model's checkpoint_path or its "
                                  "input_shape / nb_components in the YAML.")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: {key} holds NaN or inf; the file is damaged: "
                                  "download it again.")
    return state


def release_contents(config_yaml: str | os.PathLike,
                     checkpoint_folder: str | os.PathLike | None = None
                     ) -> tuple[dict[str, int], int, int, dict[str, Path]]:
    """What a release holds, read from its YAML without reading any weights: the widths by the
    release's model names, n, k and the ``.pth`` file of every model, found as
    :func:`import_official` finds them. Raises :class:`CheckpointError` as it does."""
    config = Path(config_yaml).expanduser()
    folder = None if checkpoint_folder is None else Path(checkpoint_folder).expanduser()
    dims, n, k, _, files = _official_config(config)
    return dims, n, k, {name: _official_file(files[name], name, config, folder) for name in dims}


def import_official(config_yaml: str | os.PathLike,
                    checkpoint_folder: str | os.PathLike | None = None) -> core.USAE:
    """The authors' released USAE as a :class:`usae_core.USAE`, in eval mode on the CPU.

    Its ``encode`` and ``decode`` compute what the released code computes (in fp32):
    ``(a - mean) / (std + 1e-5)``, Linear, BatchNorm with its running statistics, ReLU,
    per-token TopK, ``codes @ D`` with the rows of D normalised by ``(norm + 1e-8)``, then
    un-standardised.

    Parameters
    ----------
    config_yaml : path
        The release's YAML (``checkpoints/config_dino_siglip_vit.yaml``): model names and widths
        (``model_zoo``), their ``model_mean`` / ``model_std``, ``sae_params.top_k`` and
        ``global.nb_components`` (or ``exp_factor`` x ``input_shape``).
    checkpoint_folder : path, optional
        Where the ``.pth`` files are (their file names in each ``checkpoint_path``). Default: each
        ``checkpoint_path`` relative to the YAML's folder or as written, or its file name beside
        the YAML.

    A YAML or ``.pth`` that is missing, damaged, holds more than tensors, or disagrees with the
    other raises :class:`CheckpointError`, naming the file and the fix.
    """
    config = Path(config_yaml).expanduser()
    folder = None if checkpoint_folder is None else Path(checkpoint_folder).expanduser()
    dims, n, k, stats, files = _official_config(config)
    model = core.USAE(dims, n, k)
    state = model.state_dict()
    for name in dims:
        ours = {key: state[f"pairs.{name}.{key}"] for key in OFFICIAL_KEYS.values()}
        released = _official_state(_official_file(files[name], name, config, folder), ours)
        for key, value in released.items():
            state[f"pairs.{name}.{OFFICIAL_KEYS[key]}"] = value
    model.load_state_dict(state, strict=True)
    model.set_standardization(stats)  # scalar statistics, no channel centring (as released)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert the authors' released USAE (its YAML and .pth files) into a "
                    "checkpoint of this library.")
    parser.add_argument("config", metavar="CONFIG_YAML", help="the release's YAML")
    parser.add_argument("--checkpoints", metavar="DIR", help="folder of the .pth files "
                        "(default: the YAML's checkpoint_path entries, or beside the YAML)")
    parser.add_argument("--out", required=True, metavar="FILE_OR_FOLDER",
                        help="a .safetensors file, or a folder to share")
    args = parser.parse_args(argv)
    try:
        model = import_official(args.config, args.checkpoints)
        save(model, args.out)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        sys.exit(f"error: {error}")
    print(f"wrote {args.out}: {model.dims} (name: width), n={model.n_concepts}, k={model.k}")


if __name__ == "__main__":
    main()
