"""Tests of usae_pipeline: bad experiment settings are refused before any work; no loader of
the project can unpickle. run_all.sh's options are tested in test_cli.py."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import usae_pipeline as pipeline
from conftest import ROOT

# ----------------------------------------------------------------------------------------------
# Bad configuration, refused before any long work


EXPERIMENT_CASES = [
    ({"n_concepts": -5}, "n_concepts must be a positive integer"),
    ({"k": -1}, "k must be a positive integer"),
    ({"n_concepts": 64, "k": 64}, "k=64 must be smaller than n_concepts=64"),
    ({"batch_tokens": 2.5}, "batch_tokens must be a positive integer"),
    ({"seed": "1"}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": 2**64}, "seed must be an integer in \\[0, 2\\*\\*63\\)"),
    ({"preset": "imagenet"}, "unknown preset 'imagenet'"),
    ({"backbones": ["dinov2_imgfocus", "resnet_from_nowhere"]}, "unknown backbone"),
    ({"backbones": "dinov2_imgfocus"}, "backbones must be a list"),
    ({"backbones": ["dinov2_imgfocus"]}, "at least two distinct models"),
    ({"device": "tpu"}, "device must be cpu or cuda"),
    ({"epochs": float("nan")}, "epochs must be a positive number"),
    ({"epochs": True}, "epochs must be a positive number"),
    ({"lr": -1e-3}, "lr must be a positive number"),
    ({"train_images": -3}, "train_images must be an integer >= 0"),
    ({"tokens_per_image": 500}, "exceeds the 196 grid positions"),
    ({"quick": "yes"}, "quick must be True or False"),
    ({"images": "{missing}"}, "does not exist"),
    ({"images": "{file}"}, "is not a folder"),
    ({"images": "{empty}"}, "no image found"),
    ({"images": 5}, "images must be a folder path"),
    ({"out": "{file}"}, "exists and is not a folder"),
    ({"figures": "{file}"}, "the figure folder .* exists and is not a folder"),
    ({"figures": 5}, "figures must be a folder path"),
    ({"preset": "paper"}, "needs --images"),
]


@pytest.mark.parametrize("options, message", EXPERIMENT_CASES,
                         ids=[str(o) for o, _ in EXPERIMENT_CASES])
def test_experiment_refuses_nonsense(options, message, odd_paths):
    options = {k: v.format(**odd_paths) if isinstance(v, str) else v for k, v in options.items()}
    options.setdefault("out", str(odd_paths["missing"] / "out"))
    with pytest.raises(ValueError, match=message):
        pipeline.Experiment(**options)


# ----------------------------------------------------------------------------------------------
# --checkpoint: a USAE to analyse instead of training one (usae_origin has the details)


@pytest.fixture
def imagenet_root(tmp_path):
    """An ImageNet-like root: train/ and val/, one folder per class, one image each."""
    from conftest import coded_image

    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01").mkdir(parents=True)
        coded_image(1).save(tmp_path / "imagenet" / split / "n01" / "x.png")
    return tmp_path / "imagenet"


@pytest.fixture
def release(tmp_path):
    from test_official import PAPER_DIMS, write_release

    return write_release(tmp_path / "release", dims=PAPER_DIMS, n=64, k=4)[0]


def paper(imagenet_root, tmp_path, **options) -> pipeline.Experiment:
    return pipeline.Experiment(preset="paper", images=str(imagenet_root), quick=True,
                               out=str(tmp_path / "out"), **options)


def test_checkpoint_gives_n_and_k_and_maps_the_release_onto_the_paper_backbones(
        imagenet_root, release, tmp_path):
    exp = paper(imagenet_root, tmp_path, checkpoint=str(release))
    assert (exp.n_concepts, exp.k) == (64, 4)  # the checkpoint's, not the preset's 6144 / 32
    assert exp.checkpoint == str(release)
    hub_free = paper(imagenet_root, tmp_path, checkpoint=str(release),
                     backbones=["random:dinov2", "random:siglip", "random:vit"])
    assert hub_free.names == ["random_dinov2", "random_siglip", "random_vit"]
    assert pipeline.Experiment(**pipeline.dataclasses.asdict(exp)) == exp  # experiment.json


@pytest.mark.parametrize("options, message", [
    ({"checkpoint": "{missing}"}, "checkpoint .* does not exist"),
    ({"checkpoint": "{file}"}, "of no known kind"),
    ({"checkpoint": "{empty}"}, "of no known kind"),
    ({"checkpoint": 5}, "checkpoint must be a path"),
    ({"checkpoint": "{release}", "n_concepts": 128}, "n_concepts=128 differs from the "
                                                     "checkpoint's n_concepts=64"),
    ({"checkpoint": "{release}", "k": 8}, "k=8 differs from the checkpoint's k=4"),
    ({"checkpoint": "{release}", "backbones": ["dinov2_imgfocus_block9", "siglip", "vit"]},
     "model 'DinoV2' .* has no backbone in this run"),
    ({"checkpoint": "{ours}"}, "holds the models \\['a', 'b'\\], but this run's are"),
])
def test_experiment_refuses_a_bad_checkpoint(options, message, odd_paths, imagenet_root, release,
                                             tmp_path):
    import usae_checkpoint
    import usae_core

    usae_checkpoint.save(usae_core.USAE({"a": 8, "b": 8}, 64, 4), tmp_path / "ours.safetensors")
    paths = {**odd_paths, "release": release, "ours": tmp_path / "ours.safetensors"}
    options = {k: v.format(**paths) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(ValueError, match=message):
        paper(imagenet_root, tmp_path, **options)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_prepare_caches_refuses_other_widths_before_extracting(imagenet_root, tmp_path):
    """The release's DinoV2 is 768 wide here, the backbone dinov2 (ViT-S/14) 384: refused
    before a cache is built."""
    from test_official import PAPER_DIMS, write_release

    release = write_release(tmp_path / "wide", dims={**PAPER_DIMS, "DinoV2": 768}, n=64, k=4)[0]
    exp = paper(imagenet_root, tmp_path, checkpoint=str(release),
                backbones=["random:dinov2", "random:siglip", "random:vit"])
    with pytest.raises(ValueError, match="model 'DinoV2' .* has width 768, but the backbone "
                                         "'random_dinov2' gives tokens of width 384"):
        pipeline.prepare_caches(exp, progress=False)
    assert not (exp.folder / "caches").exists()


# ----------------------------------------------------------------------------------------------
# Safe loading


def project_sources() -> list[Path]:
    return sorted([*ROOT.glob("*.py"), *ROOT.glob("notebooks/*.py"),
                   *ROOT.glob("benchmarks/*.py")])


def test_no_loader_in_the_project_can_unpickle():
    """Every np.load keeps allow_pickle=False, every torch.load has weights_only=True, and
    nothing calls pickle, marshal, dill, joblib or an unsafe yaml.load (tests/ plants
    pickles on purpose and is not scanned)."""
    problems, loads = [], 0
    for path in project_sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            call = f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}"
            if node.func.attr == "load" and owner in ("np", "numpy"):
                loads += 1
                if keywords.get("allow_pickle", "False") != "False":
                    problems.append(call)
            elif node.func.attr == "load" and owner == "torch":
                loads += 1
                if keywords.get("weights_only") != "True":
                    problems.append(call)
            elif owner in ("pickle", "cPickle", "marshal", "dill", "joblib", "cloudpickle") \
                    and node.func.attr.startswith("load"):
                problems.append(call)
            elif owner == "yaml" and node.func.attr in ("load", "unsafe_load", "full_load"):
                problems.append(call)
    assert loads >= 3 and not problems, problems


# ----------------------------------------------------------------------------------------------
# Which run a notebook opens: its parameter, USAE_RUN, the run it sits in, or the default run


def saved_run(folder: Path, **options) -> pipeline.Experiment:
    """A synthetic quick experiment saved into ``folder`` as run_all.sh saves it."""
    exp = pipeline.Experiment(preset="synthetic", quick=True, out=str(folder), **options)
    exp.folder.mkdir(parents=True, exist_ok=True)
    exp.save()
    return exp


def test_resolve_experiment_takes_the_parameter_then_usae_run_then_the_run_it_sits_in(
        tmp_path, capsys):
    by_variable, around = saved_run(tmp_path / "by_variable"), saved_run(tmp_path / "around")
    inside = around.folder / "notebooks"
    inside.mkdir()
    environ = {"USAE_RUN": str(by_variable.folder)}
    given = {"preset": "synthetic", "seed": 3}
    assert pipeline.resolve_experiment(given, cwd=inside, environ=environ) == given
    assert "the notebook's parameter" in capsys.readouterr().out
    fields = pipeline.resolve_experiment({}, cwd=inside, environ=environ)
    assert pipeline.Experiment(**fields) == by_variable
    assert f"{by_variable.folder}/experiment.json (USAE_RUN)" in capsys.readouterr().out
    fields = pipeline.resolve_experiment({}, cwd=inside, environ={})
    assert pipeline.Experiment(**fields) == around
    assert "(the run this notebook is in)" in capsys.readouterr().out
    assert pipeline.resolve_experiment({}, cwd=tmp_path, environ={}) == {}
    assert "the default run" in capsys.readouterr().out


def test_a_relative_usae_run_is_relative_to_the_repository_not_the_notebook(tmp_path,
                                                                            monkeypatch):
    saved_run(tmp_path / "results" / "mine")
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    fields = pipeline.resolve_experiment({}, cwd=tmp_path / "notebooks",
                                         environ={"USAE_RUN": "results/mine"})
    assert fields["out"] == str(tmp_path / "results" / "mine")


def test_usae_run_without_experiment_json_is_refused_naming_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no experiment.json"):
        pipeline.resolve_experiment(None, environ={"USAE_RUN": str(tmp_path)})


def test_experiment_json_holds_absolute_paths_whatever_the_working_directory(tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = saved_run(Path("run"))  # relative, as a notebook might write it
    saved = json.loads((tmp_path / "run" / "experiment.json").read_text())
    assert (saved["out"], saved["figures"]) == (str(tmp_path / "run"),
                                                str(tmp_path / "run" / "figures"))
    monkeypatch.chdir(ROOT / "notebooks")  # where a kernel runs: the same folders
    assert pipeline.saved_experiment(tmp_path / "run")["figures"] == saved["figures"]
    assert exp.out == "run"  # the experiment itself is unchanged


def test_a_moved_run_opens_where_it_is_now_with_its_own_figures(tmp_path):
    saved_run(tmp_path / "before")
    (tmp_path / "before").rename(tmp_path / "after")
    exp = pipeline.Experiment(**pipeline.saved_experiment(tmp_path / "after"))
    assert (exp.out, exp.figures) == (str(tmp_path / "after"), str(tmp_path / "after" / "figures"))


def test_a_reopened_run_never_writes_the_repository_figures_unless_it_is_the_default_run(
        tmp_path):
    """A quick run of the offline preset, re-opened from its folder, keeps <out>/figures; the
    default run's experiment.json keeps the repository's figures/ (the README shows them)."""
    quick = pipeline.saved_experiment(saved_run(tmp_path / "quick").folder)
    assert quick["figures"] == str(tmp_path / "quick" / "figures")
    default = pipeline.Experiment()  # not saved: its folder is the repository's results/
    assert default.figures == str(ROOT / "figures")
    fields = {**pipeline.dataclasses.asdict(default), "out": str(tmp_path / "default")}
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "experiment.json").write_text(json.dumps(fields))
    assert pipeline.saved_experiment(tmp_path / "default")["figures"] == str(ROOT / "figures")


def test_a_parameter_that_disagrees_with_the_run_it_names_is_refused(tmp_path):
    """Opening a quick run with quick=False would analyse its USAE under the full sizes."""
    run = saved_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"holds the results of another experiment: quick=False "
                                         r"\(experiment.json: True\); n_concepts=256 "
                                         r"\(experiment.json: 128\)") as refused:
        pipeline.open_experiment({"preset": "synthetic", "out": str(run.folder)})
    assert f"USAE_RUN={run.folder}" in str(refused.value)
    assert "seed" not in str(refused.value)  # only the fields that differ
    # where it computes and where its figures go may differ; everything else must match
    same = pipeline.open_experiment({"preset": "synthetic", "quick": True, "out": str(run.folder),
                                     "figures": str(tmp_path / "elsewhere")})
    assert same.figures == str(tmp_path / "elsewhere")


def test_progress_bars_unless_usae_progress_is_0():
    assert pipeline.progress_bars({}) and pipeline.progress_bars({"USAE_PROGRESS": "1"})
    assert not pipeline.progress_bars({"USAE_PROGRESS": "0"})


# ----------------------------------------------------------------------------------------------
# Training the USAE and the independent SAEs side by side


def _tiny_run(folder: Path) -> tuple[pipeline.Experiment, object]:
    exp = pipeline.Experiment(preset="synthetic", quick=True, out=str(folder), n_concepts=32,
                              k=4, train_images=6, val_images=2, ood_images=2, epochs=2.0,
                              independent_epochs=3.0)
    return exp, pipeline.prepare_caches(exp, progress=False)["train"]


def test_side_by_side_training_gives_what_one_after_another_gives(tmp_path):
    """Spawned workers on one thread each train the same SAEs, from the same seeds and
    batches, as this process on one thread: the same weights and histories, to the bit."""
    import torch

    import usae_origin as origin

    exp, cache = _tiny_run(tmp_path / "parallel")
    alone, cache_alone = _tiny_run(tmp_path / "alone")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # a budget of one thread: one per worker
        model, saes = pipeline.train_models(exp, cache, workers=2, progress=False)
        model_alone, saes_alone = pipeline.train_models(alone, cache_alone, workers=1,
                                                        progress=False)
    finally:
        torch.set_num_threads(threads)
    assert list(saes) == list(saes_alone) == exp.names
    for a, b in [(model, model_alone)] + [(saes[n], saes_alone[n]) for n in exp.names]:
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[key], b.state_dict()[key])
                   for key in a.state_dict())
    for name in ["usae.safetensors"] + [f"sae_{n}.safetensors" for n in exp.names]:
        history = origin.training_history(exp.folder / name)
        assert history == origin.training_history(alone.folder / name)
        assert history[-1]["step"] == pipeline._steps(
            exp, cache, exp.epochs if name == "usae.safetensors" else exp.independent_epochs)


def test_a_failing_job_stops_side_by_side_training_with_its_own_error(tmp_path):
    """An SAE that cannot take its checkpoint's lock (another process is training into it)
    raises that error in the caller, naming the file; a re-run finishes every model."""
    import usae_io

    exp, cache = _tiny_run(tmp_path)
    lock = exp.folder / f"sae_{exp.names[1]}.safetensors.lock"
    with usae_io.exclusive(lock, "a test holding the lock"), \
            pytest.raises(usae_io.BusyError, match=f"sae_{exp.names[1]}.safetensors"):
        pipeline.train_models(exp, cache, workers=2, progress=False)
    model, saes = pipeline.train_models(exp, cache, workers=2, progress=False)
    assert sorted(saes) == sorted(exp.names)


def _processes() -> dict[int, tuple[str, int]]:
    """Every process: pid -> (state, parent pid), from Linux's /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:  # it exited while we looked
            continue
        table[int(stat.parent.name)] = state, int(parent)
    return table


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_killed_caller_leaves_no_training_process_and_a_rerun_resumes(tmp_path):
    """SIGKILL of the process that trains side by side (a kernel killed mid-training) takes its
    workers with it, so no orphan keeps training or holds a checkpoint's lock; a re-run
    finishes every model."""
    import signal
    import subprocess
    import sys
    import time

    import usae_origin as origin

    options = dict(preset="synthetic", quick=True, out=str(tmp_path), n_concepts=32, k=4,
                   train_images=6, val_images=2, ood_images=2, epochs=2.0,
                   independent_epochs=600.0)
    script = ("import usae_pipeline as p\n"
              f"exp = p.Experiment(**{options!r})\n"
              "p.train_models(exp, p.prepare_caches(exp, progress=False)['train'], workers=2,"
              " progress=False)\n")
    caller = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("sae_*.safetensors")):  # the SAEs' processes are training
            assert caller.poll() is None and time.monotonic() < deadline, "training never began"
            time.sleep(0.2)
        workers = [pid for pid, (state, parent) in _processes().items()
                   if parent == caller.pid and state != "Z"]
        assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    deadline = time.monotonic() + 30
    while any(_processes().get(pid, ("Z",))[0] != "Z" for pid in workers):  # gone, or a zombie
        assert time.monotonic() < deadline, "a training process outlived its killed caller"
        time.sleep(0.2)
    exp = pipeline.Experiment(**options)
    model, saes = pipeline.train_models(exp, pipeline.prepare_caches(exp, progress=False)["train"],
                                        workers=2, progress=False)
    steps = origin.training_history(tmp_path / f"sae_{exp.names[0]}.safetensors")[-1]["step"]
    assert steps == pipeline._steps(exp, pipeline.open_caches(exp)["train"],
                                    exp.independent_epochs)
    assert sorted(saes) == sorted(exp.names)
