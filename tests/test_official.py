"""usae_official: the authors' release, written here in its layout from known weights, is
imported bit for bit; bad files are refused without running anything in them."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import usae_checkpoint as ckpt
import usae_official as official
from conftest import ROOT, Payload, truncate
from test_checkpoint import assert_same_model

# The authors' release, written here in its layout from known weights: a YAML as
# checkpoints/config_dino_siglip_vit.yaml and one uni_<model>_checkpoint_29.pth per model.

RELEASED_DIMS = {"SigLIP": 6, "DinoV2": 8, "ViT": 5}
RELEASED_STATS = {"SigLIP": (-0.030537348240613937, 2.231515407562256),  # the released values
                  "DinoV2": (0.03290482237935066, 2.474064350128174),
                  "ViT": (-0.028632672503590584, 2.1376500129699707)}
N, K = 16, 3
# The paper's timm trio (usae_backbones: dinov2 is ViT-S/14, siglip and vit ViT-B/16), by the
# release's model names: a release that run_all.sh --preset paper --checkpoint accepts.
PAPER_DIMS = {"SigLIP": 768, "DinoV2": 384, "ViT": 768}


def released_state(width: int, seed: int, n: int = N) -> dict[str, torch.Tensor]:
    """A state dict with the released key names: Linear(d, n), BatchNorm1d(n) with running
    statistics of a trained model, and the raw dictionary."""
    g, N = torch.Generator().manual_seed(seed), n
    return {"encoder.final_block.0.weight": torch.randn(N, width, generator=g) / width ** 0.5,
            "encoder.final_block.0.bias": 0.1 * torch.randn(N, generator=g),
            "encoder.final_block.1.weight": 1 + 0.3 * torch.randn(N, generator=g),
            "encoder.final_block.1.bias": 0.2 * torch.randn(N, generator=g),
            "encoder.final_block.1.running_mean": 0.3 * torch.randn(N, generator=g),
            "encoder.final_block.1.running_var": 0.5 + torch.rand(N, generator=g),
            "encoder.final_block.1.num_batches_tracked": torch.tensor(61_000),
            "dictionary._weights": torch.randn(N, width, generator=g)}


def training_checkpoint(state: dict) -> dict:
    """The released file: train.py's {"epoch", "model_state_dict", "optimizer_state_dict",
    "learning_rate"}."""
    optimizer = {"state": {0: {"step": torch.tensor(61_000.0), "exp_avg": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-6, "weight_decay": 1e-5, "params": [0, 1, 2]}]}
    return {"epoch": 29, "model_state_dict": state, "optimizer_state_dict": optimizer,
            "learning_rate": 1e-6}


def release_config(dims: dict[str, int] = RELEASED_DIMS, n: int | None = None,
                   k: int = K) -> dict:
    """The released YAML's structure; nb_components comes from exp_factor x input_shape, or is
    ``n`` when given."""
    zoo = {name: {"checkpoint_path": f"/home/authors/weights/{name}/uni_{name}_checkpoint_29.pth",
                  "input_shape": width, "num_tokens": 196, "og_model": name,
                  "model_mean": RELEASED_STATS[name][0], "model_std": RELEASED_STATS[name][1]}
           for name, width in dims.items()}
    sizes = {"exp_factor": 2, "input_shape": 8} if n is None else {"nb_components": n}
    return {"global": {**sizes, "batch_size": 32, "nb_epochs": 30,
                       "standardize": True, "divide_norm": False, "use_class_tokens": False,
                       "run_name": "${model_1}_${model_2}_${model_3}_ex${exp_factor}"},
            "viz": {"dataset": "imagenet", "batch_size": 100},
            "sae_params": {"encoder_module": "mlp_bn_1", "dictionary_initializer": None,
                           "data_initializer": None, "dictionary_normalization": "l2",
                           "top_k": k},
            "model_zoo": zoo}


def write_release(folder: Path, config: dict | None = None, dims: dict[str, int] = RELEASED_DIMS,
                  n: int = N, k: int = K) -> tuple[Path, dict]:
    """The release in ``folder``: the YAML and the .pth files (ViT's as a bare state dict, the
    others as training checkpoints). Returns the YAML's path and the state dicts. ``dims``,
    ``n``, ``k``: another release's sizes (e.g. ``PAPER_DIMS``, the real widths)."""
    folder.mkdir(parents=True, exist_ok=True)
    states = {name: released_state(width, seed, n) for seed, (name, width)
              in enumerate(dims.items())}
    for name, state in states.items():
        torch.save(state if name == "ViT" else training_checkpoint(state),
                   folder / f"uni_{name}_checkpoint_29.pth")
    path = folder / "config_dino_siglip_vit.yaml"
    default = release_config() if (dims, n, k) == (RELEASED_DIMS, N, K) else \
        release_config(dims, n, k)
    path.write_text(yaml.safe_dump(config or default, sort_keys=False))
    return path, states


def released_encode(state: dict, mean: float, std: float, acts: torch.Tensor) -> torch.Tensor:
    """The released forward pass from the raw tensors: (a - mean) / (std + 1e-5) with the
    YAML's floats, Linear, BatchNorm in eval mode (running statistics), ReLU, per-token TopK."""
    x = (acts - mean) / (std + 1e-5)
    pre = F.batch_norm(F.linear(x, state["encoder.final_block.0.weight"],
                                state["encoder.final_block.0.bias"]),
                       state["encoder.final_block.1.running_mean"],
                       state["encoder.final_block.1.running_var"],
                       state["encoder.final_block.1.weight"], state["encoder.final_block.1.bias"],
                       training=False, momentum=0.1, eps=1e-5)
    top = torch.topk(torch.relu(pre), K, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def released_decode(state: dict, mean: float, std: float, codes: torch.Tensor) -> torch.Tensor:
    """codes @ D, D the raw rows over (their L2 norm + 1e-8), then un-standardised."""
    weights = state["dictionary._weights"]
    dictionary = weights / (torch.norm(weights, p=2, dim=-1, keepdim=True) + 1e-8)
    return (codes @ dictionary) * (std + 1e-5) + mean


def test_the_imported_release_computes_the_released_forward_pass_bit_for_bit(tmp_path):
    config, states = write_release(tmp_path / "release")
    model = official.import_official(config)  # the YAML's absolute paths: found beside the YAML
    assert not model.training and model.names == list(RELEASED_DIMS)
    assert model.config() == {"dims": RELEASED_DIMS, "n_concepts": N, "k": K}
    assert model.standardization() == RELEASED_STATS
    assert all(torch.all(pair.channel_offset == 0) for pair in model.pairs.values())
    generator = torch.Generator().manual_seed(0)
    for name, width in RELEASED_DIMS.items():
        acts = RELEASED_STATS[name][0] + 2.2 * torch.randn(300, width, generator=generator)
        codes = model.encode(name, acts)
        expected = released_encode(states[name], *RELEASED_STATS[name], acts)
        assert torch.equal(codes, expected)
        assert ((codes > 0).sum(dim=1) <= K).all() and (codes > 0).any()
        for target in RELEASED_DIMS:
            assert torch.equal(model.decode(target, codes),
                               released_decode(states[target], *RELEASED_STATS[target], codes))


def test_the_release_is_found_in_a_checkpoint_folder_or_where_the_yaml_says(tmp_path):
    config, _ = write_release(tmp_path / "release")
    expected = official.import_official(config)
    elsewhere = tmp_path / "downloads"
    shutil.move(tmp_path / "release", elsewhere)
    yaml_path = tmp_path / "config.yaml"
    shutil.move(elsewhere / config.name, yaml_path)
    assert_same_model(expected, official.import_official(yaml_path, checkpoint_folder=elsewhere))
    relative = release_config()  # paths relative to the YAML's folder
    for name in RELEASED_DIMS:
        relative["model_zoo"][name]["checkpoint_path"] = f"downloads/uni_{name}_checkpoint_29.pth"
    yaml_path.write_text(yaml.safe_dump(relative, sort_keys=False))
    assert_same_model(expected, official.import_official(str(yaml_path)))


def test_an_imported_release_saved_to_a_folder_loads_identically(tmp_path):
    config, _ = write_release(tmp_path / "release")
    model = official.import_official(config)
    ckpt.save(model, tmp_path / "usae-release")
    assert_same_model(model, ckpt.load(tmp_path / "usae-release"))
    card = (tmp_path / "usae-release" / "README.md").read_text()
    assert "# USAE over SigLIP, DinoV2, ViT" in card and "| `DinoV2` | 8 |" in card


@pytest.mark.parametrize("out", ["usae.safetensors", "usae-release"])
def test_the_command_line_converts_a_release_into_a_loadable_checkpoint(tmp_path, out):
    config, _ = write_release(tmp_path / "release")
    command = [sys.executable, str(ROOT / "usae_official.py"), str(config),
               "--checkpoints", str(tmp_path / "release"), "--out", str(tmp_path / out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SigLIP" in result.stdout and f"n={N}" in result.stdout
    assert_same_model(official.import_official(config), ckpt.load(tmp_path / out))


def test_the_command_line_reports_a_bad_release_and_writes_nothing(tmp_path):
    config, _ = write_release(tmp_path / "release")
    (tmp_path / "release" / "uni_DinoV2_checkpoint_29.pth").unlink()
    command = [sys.executable, str(ROOT / "usae_official.py"), str(config),
               "--out", str(tmp_path / "usae.safetensors")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith("error: the checkpoint of DinoV2")
    assert "--checkpoints DIR" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "usae.safetensors").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pth_with_planted_code_is_refused_without_running_it(tmp_path, payload):
    config, states = write_release(tmp_path / "release")
    marker = tmp_path / "PWNED"
    planted = tmp_path / "release" / "uni_SigLIP_checkpoint_29.pth"
    torch.save({**training_checkpoint(states["SigLIP"]), "extra": Payload(marker)}, planted)
    torch.load(planted, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    for content in (None, payload[1]):  # inside a torch zip, and as a bare pickle
        if content is not None:
            planted.write_bytes(content)
        with pytest.raises(official.CheckpointError, match="uni_SigLIP_checkpoint_29.pth cannot be "
                           "read as a weights-only.*never run"):
            official.import_official(config)
        assert not marker.exists() and not payload[0].exists()


def edited(change) -> dict:
    config = release_config()
    change(config)
    return config


@pytest.mark.parametrize("config, message", [
    (edited(lambda c: c["model_zoo"]["DinoV2"].update(input_shape=7)),
     r"uni_DinoV2_checkpoint_29.pth: encoder.final_block.0.weight is \(16, 8\), but the YAML's "
     r"width and n make it \(16, 7\)"),
    (edited(lambda c: c["global"].update(nb_components=32)), r"is \(16, 6\).*\(32, 6\)"),
    (edited(lambda c: c["model_zoo"]["ViT"].pop("model_std")), "ViT has no model_mean / model_std"),
    (edited(lambda c: c["model_zoo"]["ViT"].update(model_std=-1.0)), "model_std is -1.0"),
    (edited(lambda c: c["model_zoo"]["ViT"].update(model_mean="n/a")), "must be a finite number"),
    (edited(lambda c: c.pop("model_zoo")), "'model_zoo' maps each model name"),
    (["SigLIP", "DinoV2"], "must be a mapping whose 'model_zoo'"),
    (edited(lambda c: c["sae_params"].pop("top_k")), "sae_params.top_k is None"),
    (edited(lambda c: c["sae_params"].update(top_k=16)), "k=16 must be smaller than n_concepts"),
    (edited(lambda c: c["global"].pop("exp_factor")), "global.exp_factor is None"),
    (edited(lambda c: c["global"].update(standardize=False)), "standardize is False"),
    (edited(lambda c: c["sae_params"].update(encoder_module="mlp_ln_3")), "mlp_ln_3"),
    (edited(lambda c: c["model_zoo"]["ViT"].pop("checkpoint_path")), "ViT has no checkpoint_path"),
    (edited(lambda c: c["model_zoo"].update({"Vi-T": c["model_zoo"].pop("ViT")})),
     "model name 'Vi-T' is not usable")])
def test_a_bad_release_yaml_is_refused_and_nothing_changes(tmp_path, config, message):
    path, _ = write_release(tmp_path / "release", config)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(official.CheckpointError, match=message) as error:
        official.import_official(path)
    assert str(tmp_path / "release") in str(error.value)  # names the file
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("damage, message", [
    ("truncated", "cannot be read as a weights-only PyTorch checkpoint"),
    ("empty", "cannot be read as a weights-only PyTorch checkpoint"),
    ("missing", r"the checkpoint of DinoV2 \(/home/authors/.*\) is not at any of"),
    ("a list", "holds list, but a released model is a state dict"),
    ("a key missing", r"holds \['dictionary._weights', .*\], but a released model"),
    ("NaN", "holds NaN or inf"),
    ("not yaml", "is not readable YAML"),
    ("no yaml", "no YAML configuration at")])
def test_a_bad_release_file_is_refused_with_its_name(tmp_path, damage, message):
    config, states = write_release(tmp_path / "release")
    file = tmp_path / "release" / "uni_DinoV2_checkpoint_29.pth"
    if damage == "truncated":
        truncate(file, 200)
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "missing":
        file.unlink()
    elif damage == "a list":
        torch.save([states["DinoV2"]], file)
    elif damage == "a key missing":
        del states["DinoV2"]["encoder.final_block.1.running_var"]
        torch.save(training_checkpoint(states["DinoV2"]), file)
    elif damage == "NaN":
        states["DinoV2"]["dictionary._weights"][3, 1] = float("nan")
        torch.save(states["DinoV2"], file)
    elif damage == "not yaml":
        config.write_text("model_zoo: {SigLIP: [unclosed\n")
    else:
        config.unlink()
    with pytest.raises(official.CheckpointError, match=message) as error:
        official.import_official(config)
    assert (str(config) if "yaml" in damage else "DinoV2") in str(error.value)


def test_the_authors_pth_given_to_load_points_to_import_official(tmp_path):
    write_release(tmp_path)
    with pytest.raises(official.CheckpointError, match="import_official"):
        ckpt.load(tmp_path / "uni_SigLIP_checkpoint_29.pth")
