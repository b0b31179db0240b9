"""Tests of usae_cli, the command line of run_all.sh: one option per Experiment field with its
help and default, argv -> Experiment -> experiment.json, and bad options refused within
seconds, before any work, with exit code 2."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

import usae_cli as cli
import usae_pipeline as pipeline
from conftest import ROOT
from test_io import holder

FIELDS = dataclasses.fields(pipeline.Experiment)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run_all(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), *args], capture_output=True,
                          text=True, timeout=60)


# ----------------------------------------------------------------------------------------------
# The options are generated from the dataclass


def test_every_experiment_field_is_an_option_with_help():
    table = cli.options()
    assert list(table) == [flag(f.name) for f in FIELDS]
    for option in table.values():
        assert option.help.split(" (default: ")[0].strip(), option.name


def test_a_new_field_without_a_description_is_refused(monkeypatch):
    @dataclasses.dataclass
    class Extended(pipeline.Experiment):
        new_field: int = 0

    Extended.__doc__ = pipeline.Experiment.__doc__
    monkeypatch.setattr(cli, "Experiment", Extended)
    with pytest.raises(TypeError, match="Experiment.new_field .* describe it"):
        cli.options()


def test_the_docstring_names_a_default_exactly_where_post_init_computes_one(tmp_path):
    exp = pipeline.Experiment()  # validates only: creates nothing
    computed = {f.name for f in FIELDS if getattr(exp, f.name) !=
                (f.default_factory() if f.default is dataclasses.MISSING else f.default)}
    documented = {name for name, doc in cli.field_docs(pipeline.Experiment).items()
                  if doc.default}
    assert computed == documented
    preset_dependent = {name for name, doc in cli.field_docs(pipeline.Experiment).items()
                        if doc.default == "the preset's value"}
    assert {"n_concepts", "k", "lr", "train_images", "sparse_decode", "backbones"} \
        <= preset_dependent


def test_help_lists_every_field_and_its_default():
    result = run_all("--help")
    assert result.returncode == 0 and not result.stderr
    text = " ".join(result.stdout.split())  # as if unwrapped
    for option in cli.options().values():
        assert " ".join(option.help.split()) in text, option.name
    for line in ("--n-concepts N ", "--seed N ", "--quick ", "--sparse-decode {true,false}",
                 "--backbones NAME,NAME,...", "--preset {offline,paper,synthetic}",
                 "--out DIR", "--images DIR", "--figures DIR", "-h, --help"):
        assert line in result.stdout, line
    assert "Concepts in the dictionary. (default: the preset's value)" in text
    assert "(default: 0)" in text and "(default: cpu)" in text and "(default: off)" in text
    assert "(default: results/<preset>, or results/<preset>-quick with quick)" in text


# ----------------------------------------------------------------------------------------------
# argv -> Experiment -> experiment.json


def test_argv_to_experiment_to_saved_json_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are the caller's, not the notebooks'
    argv = ["--preset", "synthetic", "--quick", "--out", "run", "--seed=7", "--n-concepts", "64",
            "--k", "3", "--lr", "0.02", "--epochs=2.5", "--backbones", "a,b,c",
            "--sparse-decode", "true", "--loss", "mse", "--train-images", "10",
            "--tokens-per-image", "49", "--standardization", "channel", "--device", "cpu"]
    exp = cli.experiment_from(argv)
    assert (exp.out, exp.figures) == (str(tmp_path / "run"), str(tmp_path / "run" / "figures"))
    assert (exp.preset, exp.quick, exp.seed, exp.n_concepts, exp.k, exp.lr, exp.epochs) == \
        ("synthetic", True, 7, 64, 3, 0.02, 2.5)
    assert (exp.backbones, exp.sparse_decode, exp.loss, exp.train_images) == \
        (["a", "b", "c"], True, "mse", 10)
    assert (exp.tokens_per_image, exp.standardization) == (49, "channel")
    assert not (tmp_path / "run").exists()  # checking creates nothing
    exp.save()
    saved = json.loads((tmp_path / "run" / "experiment.json").read_text())
    assert list(saved) == [f.name for f in FIELDS]
    assert pipeline.Experiment(**saved) == exp  # what every notebook rebuilds


@pytest.mark.parametrize("argv, out, figures", [
    ([], "results/offline", "figures"),  # the default run: the repository's figures
    (["--quick"], "results/offline-quick", "results/offline-quick/figures"),
    (["--preset", "synthetic"], "results/synthetic", "results/synthetic/figures"),
    (["--out", str(ROOT / "results" / "offline")], "results/offline", "figures"),
    (["--figures", str(ROOT / "elsewhere")], "results/offline", "elsewhere"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_default_folders_are_under_the_repository_wherever_it_is_called(argv, out, figures,
                                                                        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = cli.experiment_from(argv)
    assert (Path(exp.out), Path(exp.figures)) == (ROOT / out, ROOT / figures)


def test_value_forms():
    assert cli.parse_args(["--seed=3"]) == cli.parse_args(["--seed", "3"]) == {"seed": 3}
    assert cli.parse_args(["--seed", "007"]) == {"seed": 7}  # base 10, not octal
    assert cli.parse_args(["--seed", str(2**63 - 1)]) == {"seed": 2**63 - 1}
    assert cli.parse_args(["--sparse-decode", "False"]) == {"sparse_decode": False}
    assert cli.parse_args(["--images=--odd-name"]) == {"images": str(Path.cwd() / "--odd-name")}
    assert cli.parse_args(["--quick", "--quick"]) == {"quick": True}


# ----------------------------------------------------------------------------------------------
# Bad options, refused before any work


RUN_ALL_CASES = [  # arguments, what the message must say
    (["--bogus"], "unknown option '--bogus'"),
    (["stray"], "unknown option 'stray'"),
    (["--bogus=3"], "unknown option '--bogus'"),  # --opt=value is accepted for known options
    (["--seed"], "--seed needs a value"),
    (["--out"], "--out needs a value"),
    (["--images", "--quick"], "--images needs a value"),
    (["--preset", ""], "--preset needs a value"),
    (["--seed", "-1"], "--seed must be an integer"),
    (["--seed", "1.5"], "--seed must be an integer"),
    (["--seed", "ten"], "--seed must be an integer"),
    (["--seed=ten"], "--seed must be an integer"),
    (["--seed", "99999999999999999999"], "--seed must be an integer"),
    (["--preset", "imagenet"], "unknown preset 'imagenet'"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--device", "cuda:x"], "--device must be cpu or cuda"),
    (["--images", "{missing}"], "does not exist"),
    (["--images", "{file}"], "is not a folder"),
    (["--out", "{file}"], "exists and is not a folder"),
    (["--preset", "paper"], "needs --images"),
    (["--preset", "paper", "--images", "{no_train}"], "has no train/ folder"),
    (["--checkpoint", "{empty}"], "is of no known kind"),
]


@pytest.mark.parametrize("args, message", RUN_ALL_CASES, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_run_all_refuses_bad_options_within_seconds(args, message, odd_paths, tmp_path):
    out = tmp_path / "out"
    args = [a.format(**{k: str(v) for k, v in odd_paths.items()}) for a in args]
    # --out first, so that a refused option can never send work to the real results/ folder
    start = time.monotonic()
    result = run_all("--out", str(out), *args)
    assert time.monotonic() - start < 30
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stderr
    assert result.stderr.startswith("run_all.sh: ")
    assert result.stderr.endswith("Try 'bash run_all.sh --help'.\n")
    assert not out.exists()  # refused before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_run_all_refuses_cuda_without_a_gpu(tmp_path):
    result = run_all("--out", str(tmp_path / "o"), "--device", "cuda")
    assert result.returncode == 2 and "no CUDA GPU is visible" in result.stderr


CLI_CASES = [  # the same refusals, in process (fast): every kind of option
    (["--quick=yes"], "--quick takes no value"),
    (["--preset="], "--preset needs a value"),
    (["--sparse-decode", "maybe"], "--sparse-decode must be true or false"),
    (["--n-concepts", "1e3"], "--n-concepts must be an integer"),
    (["--n-concepts", "-5"], "--n-concepts must be a positive integer"),  # 0: the preset's
    (["--lr", "fast"], "--lr must be a number"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--epochs", "nan"], "--epochs must be a positive number"),
    (["--train-images", "-3"], "--train-images must be an integer >= 0"),
    (["--k", "300"], "k=300 must be smaller than n_concepts=256"),
    (["--backbones", "dinov2_imgfocus_block9"], "at least two distinct models"),
    (["--backbones", "dinov2_imgfocus_block9,nowhere"], "unknown backbone 'nowhere'"),
    (["--loss", "l2"], "loss='l2' is not one of"),
    (["--standardization", "none"], "standardization='none' is not one of"),
    (["--figures", "{file}"], "the figure folder"),
    (["--images", "{empty}"], "no image found"),
    (["--checkpoint", "{missing}"], "does not exist: pass a .safetensors file"),
    (["--checkpoint", "{file}"], "is of no known kind"),
    (["-x"], "unknown option '-x'"),
]


@pytest.mark.parametrize("args, message", CLI_CASES, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_cli_refuses_bad_values_naming_the_option(args, message, odd_paths, tmp_path, capsys,
                                                  monkeypatch):
    def must_not_run(exp):
        raise AssertionError(f"accepted: {args}")

    monkeypatch.setattr(cli, "run_notebooks", must_not_run)
    out = tmp_path / "out"
    args = [a.format(**{k: str(v) for k, v in odd_paths.items()}) for a in args]
    assert cli.main(["--out", str(out), *args]) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("run_all.sh: ")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Running the notebooks


def planted_notebooks(root: Path) -> None:
    """notebooks/00_fine.py, 01_broken.py (raises) and 02_never.py under ``root``."""
    header = ("# ---\n# jupyter:\n#   kernelspec:\n#     display_name: Python 3\n"
              "#     language: python\n#     name: python3\n# ---\n\n")
    (root / "notebooks").mkdir()
    for name, body in (("00_fine", "print(experiment['seed'])"),
                       ("01_broken", "raise ValueError('planted')"), ("02_never", "1")):
        (root / "notebooks" / f"{name}.py").write_text(
            f'{header}# %% tags=["parameters"]\nexperiment = {{}}\n\n# %%\n{body}\n')


def test_run_notebooks_stops_at_the_first_failure_naming_its_notebook(tmp_path, monkeypatch,
                                                                       capsys):
    planted_notebooks(tmp_path)
    monkeypatch.setattr(cli, "ROOT", tmp_path)
    monkeypatch.setenv("PYTHONPATH", "")  # restored after the test: run_notebooks sets it
    exp = pipeline.Experiment(preset="synthetic", quick=True, out=str(tmp_path / "out"))
    assert cli.run_notebooks(exp) == 1
    output = capsys.readouterr()
    executed = tmp_path / "out" / "notebooks"
    assert "00_fine done in" in output.out and "== 02_never" not in output.out
    assert f"01_broken failed (ValueError: planted); see {executed / '01_broken.ipynb'}" \
        in output.err
    assert (executed / "00_fine.ipynb").is_file() and (executed / "01_broken.ipynb").is_file()
    assert json.loads((tmp_path / "out" / "experiment.json").read_text())["seed"] == 0
    assert not (tmp_path / "notebooks" / "00_fine.ipynb").exists()  # published by default only


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(tmp_path, monkeypatch,
                                                                        capsys):
    planted_notebooks(tmp_path)
    monkeypatch.setattr(cli, "ROOT", tmp_path)
    monkeypatch.setenv("PYTHONPATH", "")
    exp = pipeline.Experiment(preset="synthetic", quick=True, out=str(tmp_path / "out"))
    process = holder(tmp_path / "out" / ".lock")
    try:
        assert cli.run_notebooks(exp) == 1
        refused = capsys.readouterr()
        assert f"process {process.pid} on " in refused.err and "Wait for it" in refused.err
        assert "== 00_fine" not in refused.out
        assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"]  # nothing written
    finally:
        process.kill()  # its lock stays behind and must not block the next run
        process.wait()
    assert cli.run_notebooks(exp) == 1  # now it runs, up to the planted failure
    assert "00_fine done in" in capsys.readouterr().out
    assert not (tmp_path / "out" / ".lock").exists()


def test_executed_notebooks_are_kept_without_parameters_widget_state_or_pairing(
        tmp_path, monkeypatch):
    """A notebook .py without metadata (jupytext.toml) runs in this kernel with no progress
    bars; its executed copy in <out>/notebooks has no injected-parameters cell (opened by hand
    it finds <out>/experiment.json), no empty tags, and is paired with no .py."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "00_plain.py").write_text(
        '# %% tags=["parameters"]\nexperiment = {}\n\n# %%\nimport os\n'
        'print("progress:", os.environ.get("USAE_PROGRESS"), "seed:", experiment["seed"])\n')
    monkeypatch.setattr(cli, "ROOT", tmp_path)
    monkeypatch.setenv("PYTHONPATH", "")  # both restored after the test: run_notebooks sets them
    monkeypatch.delenv("USAE_PROGRESS", raising=False)
    exp = pipeline.Experiment(preset="synthetic", quick=True, out=str(tmp_path / "out"), seed=7)
    assert cli.run_notebooks(exp) == 0
    notebook = json.loads((tmp_path / "out" / "notebooks" / "00_plain.ipynb").read_text())
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    assert notebook["metadata"]["jupytext"]["formats"] == "ipynb"
    assert "widgets" not in notebook["metadata"]
    assert notebook["metadata"]["papermill"]["parameters"]["experiment"]["seed"] == 7
    assert [cell["metadata"].get("tags") for cell in notebook["cells"]] == [["parameters"], None]
    assert "".join(notebook["cells"][1]["outputs"][0]["text"]) == "progress: 0 seed: 7\n"


def test_kept_notebook_pairs_only_the_published_copy():
    import nbformat

    def executed():
        return nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_code_cell("experiment = {}", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("experiment = {'seed': 1}",
                                      metadata={"tags": ["injected-parameters"]}),
            nbformat.v4.new_markdown_cell("text", metadata={"tags": []}),
            nbformat.v4.new_code_cell("show_widget(...)", outputs=[nbformat.v4.new_output(
                "display_data", data={cli.WIDGET_VIEW: {"model_id": "dead"},
                                      "image/png": "iVBOR", "text/plain": "explorer"})])],
            metadata={"widgets": {"application/vnd.jupyter.widget-state+json": {}},
                      "jupytext": {"formats": "ipynb,py:percent"}})

    for paired, formats in ((True, "ipynb,py:percent"), (False, "ipynb")):
        kept = cli.kept_notebook(executed(), paired=paired)
        assert [cell.source for cell in kept.cells] == ["experiment = {}", "text",
                                                        "show_widget(...)"]
        # the widget's kernel is gone: every viewer, JupyterLab too, draws the saved image
        assert set(kept.cells[2].outputs[0].data) == {"image/png", "text/plain"}
        assert kept.cells[1].metadata == {} and "widgets" not in kept.metadata
        assert kept.metadata.jupytext.formats == formats
