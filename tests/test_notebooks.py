"""The notebooks: paired files in sync, papermill parameters, and the quick end-to-end run."""
import ast
import json
import os
import re
import shutil
import subprocess
import time
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


# ----------------------------------------------------------------------------------------------
# JupyterLab as a way in: the modules import from anywhere, a notebook finds its run, the
# notebooks read well without a kernel, and saving one in JupyterLab keeps its .py as written

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "  0%|          | 0/64"


def kernel_free_problems(notebook) -> list[str]:
    """What a reader without a kernel (GitHub, nbviewer) would see wrong in ``notebook``: a
    widget with no image to fall back on, saved widget state, a progress bar, a stray repr (a
    cell's value printed as text: a PosixPath, a dict), a warning."""
    problems = ["widget state in the metadata"] if "widgets" in notebook.metadata else []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            texts = [output.get("text", ""), *(v for v in data.values() if isinstance(v, str))]
            where = f"cell {index} ({output.output_type})"
            if WIDGET_VIEW in data and "image/png" not in data:
                problems.append(f"{where}: a widget without an image/png fallback")
            if any(PROGRESS_BAR.search(text) for text in texts):
                problems.append(f"{where}: a progress bar")
            if any("PosixPath(" in text for text in texts):
                problems.append(f"{where}: a PosixPath repr")
            if output.output_type == "execute_result" and set(data) == {"text/plain"}:
                problems.append(f"{where}: a stray repr {data['text/plain'][:60]!r}")
            if output.get("name") == "stderr" and "Warning:" in output.get("text", ""):
                # e.g. usae_figures.save's "overlapping texts": a figure nobody can read
                problems.append(f"{where}: a warning {output['text'][:120]!r}")
    return problems


def test_the_kernel_free_check_finds_what_readers_saw_in_the_notebooks():
    """The outputs the committed notebooks had (the explorer as a bare widget, tqdm's widgets,
    a returned path, a returned dict), each caught."""
    import nbformat

    outputs = [
        nbformat.v4.new_output("display_data", {WIDGET_VIEW: {"model_id": "a"},
                                                "text/plain": "Tab(children=(VBox(..."}),
        nbformat.v4.new_output("display_data", {WIDGET_VIEW: {"model_id": "b"}, "text/plain":
                                                "caching:   0%|          | 0/64 [00:00<?]"}),
        nbformat.v4.new_output("execute_result", {"text/plain": "PosixPath('/x/fig7.png')"}),
        nbformat.v4.new_output("execute_result", {"text/plain": "{'actmax_objective_gain': 1}"}),
        nbformat.v4.new_output("stream", name="stderr", text="USAE:  40%|####  | 4/10\r"),
        nbformat.v4.new_output("stream", name="stderr", text="x.py:2: UserWarning: "
                               "explorer_static_view: overlapping texts [('#10', 'dinov2')]")]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=outputs)])
    assert len(kernel_free_problems(notebook)) == 8
    widget_with_image = nbformat.v4.new_output("display_data", {
        WIDGET_VIEW: {"model_id": "a"}, "image/png": "iVBOR", "text/plain": "the explorer"})
    notebook.cells[0].outputs = [widget_with_image]
    assert kernel_free_problems(notebook) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_reads_well_without_a_kernel(path):
    """The outputs come from the default run (run_all.sh refreshes notebooks/*.ipynb)."""
    notebook = jupytext.read(path.with_suffix(".ipynb"))
    assert kernel_free_problems(notebook) == []


@pytest.mark.e2e
def test_quick_run_notebooks_read_well_without_a_kernel_and_are_unpaired(quick_run):
    out, _ = quick_run
    for stem in (p.stem for p in NOTEBOOKS):
        notebook = jupytext.read(out / "notebooks" / f"{stem}.ipynb")
        assert kernel_free_problems(notebook) == [], stem
        assert notebook.metadata["jupytext"]["formats"] == "ipynb", stem  # saving: itself only
        assert not any("injected-parameters" in cell.metadata.get("tags", [])
                       for cell in notebook.cells), stem


@pytest.mark.e2e
def test_a_quick_run_notebook_opened_in_its_folder_finds_its_run(quick_run, tmp_path,
                                                                  monkeypatch):
    """As in JupyterLab: <copy>/notebooks/03_universality.ipynb run in its own folder, with no
    parameter and no USAE_RUN, analyses the run it sits in (copied elsewhere, so its
    experiment.json names another folder) and writes that run's figures."""
    import nbclient

    out, _ = quick_run
    copy = tmp_path / "copied"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".lock"))
    repository_figures = {p: p.stat().st_mtime_ns for p in (ROOT / "figures").glob("*.png")}
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # as install.sh's editable install would
    monkeypatch.delenv("USAE_RUN", raising=False)
    start = time.time()
    notebook = jupytext.read(copy / "notebooks" / "03_universality.ipynb")
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(copy / "notebooks")}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert f"experiment: {copy}/experiment.json (the run this notebook is in)" in printed
    assert (copy / "figures" / "fig6a_firing_entropy.png").stat().st_mtime >= start
    assert (out / "figures" / "fig6a_firing_entropy.png").stat().st_mtime < start
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "figures").glob("*.png")} == \
        repository_figures


def test_the_notebooks_import_the_modules_without_touching_sys_path():
    for path in NOTEBOOKS:
        assert "sys.path" not in path.read_text(), path.name


def test_pyproject_installs_every_module():
    """install.sh's `pip install -e .` makes the modules importable from any folder; a module
    left out of py-modules would import only from the repository root."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["py-modules"] == \
        sorted(p.stem for p in ROOT.glob("usae_*.py"))
    assert "dependencies" not in project["project"]  # requirements.txt is the one list


def jupytext_settings():
    from jupytext.config import load_jupytext_configuration_file

    return load_jupytext_configuration_file(str(ROOT / "jupytext.toml"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_writes_back_its_py_byte_for_byte(path):
    config = jupytext_settings()
    notebook = jupytext.read(path.with_suffix(".ipynb"), config=config)
    assert jupytext.writes(notebook, "py:percent", config=config) == path.read_text()


def test_saving_in_jupyterlab_keeps_the_py_and_leaves_a_run_copy_alone(tmp_path):
    """JupyterLab's jupytext contents manager, in a copy of the repository's layout: saving
    notebooks/NN.ipynb, with what JupyterLab changes (the kernel's display name and version,
    a collapsed heading, timings), writes back the same .py; saving a run's executed copy in
    results/<run>/notebooks writes that .ipynb and nothing else."""
    import copy as copying

    import nbformat
    from jupytext import TextFileContentsManager

    import usae_cli

    stem = "02_reconstruction"
    (tmp_path / "notebooks").mkdir()
    shutil.copy(ROOT / "jupytext.toml", tmp_path)
    for suffix in (".py", ".ipynb"):
        shutil.copy(ROOT / "notebooks" / f"{stem}{suffix}", tmp_path / "notebooks")
    run = tmp_path / "results" / "run" / "notebooks"
    run.mkdir(parents=True)
    executed = usae_cli.kept_notebook(
        nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4), paired=False)
    nbformat.write(executed, run / f"{stem}.ipynb")
    manager = TextFileContentsManager(root_dir=str(tmp_path))
    for path in (f"notebooks/{stem}.ipynb", f"results/run/notebooks/{stem}.ipynb"):
        model = manager.get(path)
        notebook = copying.deepcopy(model["content"])
        notebook.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)",
                                           "language": "python", "name": "python3"}
        notebook.metadata["language_info"] = {"name": "python", "version": "3.12.1"}
        notebook.cells[0].metadata["jp-MarkdownHeadingCollapsed"] = True
        notebook.cells[2].metadata["execution"] = {"iopub.status.idle": "2030-01-01T00:00:00Z"}
        manager.save({"type": "notebook", "format": "json", "content": notebook}, path)
    assert (tmp_path / "notebooks" / f"{stem}.py").read_bytes() == \
        (ROOT / "notebooks" / f"{stem}.py").read_bytes()
    assert [p.name for p in run.glob("*") if not p.name.startswith(".")] == [f"{stem}.ipynb"]
