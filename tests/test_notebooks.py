"""The notebooks: paired files in sync, papermill parameters, and the quick end-to-end run."""
import ast
import json
import os
import shutil
import subprocess
from pathlib import Path

import jupytext
import pytest

from conftest import run_quick

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
FIGURES = ["training_curves", "fig4_qualitative_concepts", "fig5_cross_model_r2",
           "fig5_cross_model_r2_per_dim",
           "table1_reconstruction", "fig6a_firing_entropy", "fig6b_cofire_proportion",
           "fig6c_energy_vs_cofire", "fig7_consistency", "fig16_consistency_top_cofiring",
           "fig8_coordinated_actmax", "fig11_12_model_unique_concepts", "explorer_static_view"]
METRIC_KEYS = {"models", "r2_paper", "r2_per_dim", "mse", "ood", "firing_entropy",
               "cofire_proportion_top1000", "cofire_proportion_top1000_chance", "energy_vs_cofire", "dead_fraction", "consistency",
               "n_concepts", "k", "n_tokens", "seed", "dictionary_cosine_to_init",
               "independent_dictionary_cosine_to_init", "training_final", "untrained"}


def sources(notebook):
    return [(cell.cell_type, cell.source) for cell in notebook.cells
            if "injected-parameters" not in cell.metadata.get("tags", [])]


def test_there_is_a_notebook_per_paper_section():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_paired_notebook_is_in_sync_with_its_text_file(path):
    paired = path.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} is missing: run `jupytext --sync {path}`"
    assert sources(jupytext.read(path)) == sources(jupytext.read(paired)), (
        f"{path.name} and {paired.name} differ: run `jupytext --sync {path}`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_a_papermill_parameters_cell(path):
    cells = jupytext.read(path).cells
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    # One parameter: the Experiment's fields, as run_all.sh passes them; {}: the default run.
    assert [ast.unparse(node) for node in ast.parse(tagged[0].source).body] == ["experiment = {}"]


@pytest.mark.e2e
def test_run_all_quick_produces_every_figure_and_complete_metrics(quick_run):
    out, result = quick_run
    for name in FIGURES:
        path = out / "figures" / f"{name}.png"
        assert path.is_file() and path.read_bytes().startswith(b"\x89PNG"), name
        assert path.stat().st_size > 5000, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics), METRIC_KEYS - set(metrics)
    assert len(metrics["consistency"]) == len(metrics["models"]) == 3
    # training learned: every dictionary left its random start, and the USAE's concepts match
    # the independent SAEs' better than a random dictionary does
    for name in metrics["models"]:
        moved = metrics["dictionary_cosine_to_init"]
        assert moved[name] < 0.95, moved
        index = metrics["models"].index(name)
        assert metrics["r2_paper"][index][index] > metrics["untrained"]["r2_paper"][index][index]
        found = metrics["consistency"][name]
        assert found["auc"] > 1.2 * found["random_baseline_auc"], (name, found)
        # the top concepts co-fire across models more often than independent firing would give
        assert metrics["cofire_proportion_top1000"][name] > \
            2 * metrics["cofire_proportion_top1000_chance"][name], name
    for stem in (p.stem for p in NOTEBOOKS):
        assert (out / "notebooks" / f"{stem}.ipynb").is_file()
        assert f"{stem} done in" in result.stdout


def test_run_all_refuses_an_empty_image_folder_before_any_work_with_a_non_zero_exit(tmp_path):
    bad = tmp_path / "empty"
    bad.mkdir()
    result = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--images", str(bad), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "no image found" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.e2e
def test_quick_run_is_deterministic_under_a_seed(quick_run, tmp_path):
    out, _ = quick_run
    first = (out / "metrics.json").read_bytes()
    again = run_quick(tmp_path / "again", seed=0)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / "metrics.json").read_bytes() == first
    other = run_quick(tmp_path / "other", seed=1)
    assert other.returncode == 0, other.stderr[-3000:]
    other_metrics = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert other_metrics["seed"] == 1
    assert other_metrics["r2_paper"] != json.loads(first)["r2_paper"]


@pytest.mark.e2e
def test_paper_preset_with_a_released_checkpoint_analyses_it_without_training(
        tmp_path, shared_data_dir):
    """run_all.sh --preset paper --checkpoint <the authors' YAML>, hub-free: the paper's timm
    trio at random weights (random:dinov2, ...: the same architectures and widths), a release
    written in the authors' layout at those widths with a small n and k, and a few real photos
    as the ImageNet root. Notebook 00 imports the release instead of training; 01-06 analyse it."""
    import torch

    import usae_checkpoint as ckpt
    import usae_official as official
    import usae_origin as origin
    from test_official import PAPER_DIMS, write_release

    root = tmp_path / "imagenet"
    for split, source, count in (("train", "imagenet-200x5", 4), ("val", "imagenet-1000x1", 6)):
        (root / split).mkdir(parents=True)
        for photo in sorted((shared_data_dir / source).glob("*.jpg"))[:count]:
            shutil.copy(photo, root / split / photo.name)
    config, _ = write_release(tmp_path / "release", dims=PAPER_DIMS, n=64, k=4)
    out = tmp_path / "out"
    backbones = "random:dinov2,random:siglip,random:vit"
    result = subprocess.run(
        ["bash", str(ROOT / "run_all.sh"), "--preset", "paper", "--quick", "--images", str(root),
         "--checkpoint", str(config), "--backbones", backbones, "--out", str(out),
         "--train-images", "4", "--val-images", "6", "--ood-images", "3",
         "--batch-tokens", "392"],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stem in (p.stem for p in NOTEBOOKS):
        assert (out / "notebooks" / f"{stem}.ipynb").is_file()
        assert f"{stem} done in" in result.stdout
    # no USAE training: the installed file has no history and holds the release's weights
    usae = out / "usae.safetensors"
    names = ["random_dinov2", "random_siglip", "random_vit"]
    assert not origin.trained_here(usae)
    released = origin.renamed(official.import_official(config), {
        "DinoV2": "random_dinov2", "SigLIP": "random_siglip", "ViT": "random_vit"}, names)
    installed = ckpt.load(usae)
    assert installed.names == names and (installed.n_concepts, installed.k) == (64, 4)
    assert all(torch.equal(a, b) for a, b in zip(installed.state_dict().values(),
                                                  released.state_dict().values()))
    # the independent SAEs were trained (section 4.4)
    assert all(origin.trained_here(out / f"sae_{name}.safetensors") for name in names)
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics), METRIC_KEYS - set(metrics)
    assert metrics["usae_trained_here"] is False and metrics["usae_checkpoint"] == str(config)
    assert metrics["train_steps"] == 0 and metrics["training_final"] is None
    assert metrics["dictionary_cosine_to_init"] is None
    assert set(metrics["independent_dictionary_cosine_to_init"]) == set(names)
    assert metrics["models"] == names and (metrics["n_concepts"], metrics["k"]) == (64, 4)
    for name in FIGURES:
        path = out / "figures" / f"{name}.png"
        assert path.is_file() and path.read_bytes().startswith(b"\x89PNG"), name
