"""Tests of usae_pipeline and run_all.sh: bad options and experiment settings are refused
within seconds, before any work; no loader of the project can unpickle."""
from __future__ import annotations

import ast
import subprocess
import time
from pathlib import Path

import pytest
import torch

import usae_pipeline as pipeline
from conftest import ROOT

# ----------------------------------------------------------------------------------------------
# Bad configuration, refused before any long work


RUN_ALL_CASES = [  # arguments, what the message must say
    (["--bogus"], "unknown option '--bogus'"),
    (["stray"], "unknown option 'stray'"),
    (["--seed=3"], "unknown option '--seed=3'"),
    (["--seed"], "--seed needs a value"),
    (["--out"], "--out needs a value"),
    (["--images", "--quick"], "--images needs a value"),
    (["--preset", ""], "--preset needs a value"),
    (["--seed", "-1"], "--seed must be an integer"),
    (["--seed", "1.5"], "--seed must be an integer"),
    (["--seed", "ten"], "--seed must be an integer"),
    (["--seed", "99999999999999999999"], "--seed must be an integer"),
    (["--preset", "imagenet"], "unknown preset 'imagenet'"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--device", "cuda:x"], "--device must be cpu or cuda"),
    (["--images", "{missing}"], "does not exist"),
    (["--images", "{file}"], "is not a folder"),
    (["--out", "{file}"], "exists and is not a folder"),
    (["--preset", "paper"], "needs --images"),
    (["--preset", "paper", "--images", "{no_train}"], "has no train/ folder"),
]


@pytest.mark.parametrize("args, message", RUN_ALL_CASES, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_run_all_refuses_bad_options_within_seconds(args, message, odd_paths, tmp_path):
    out = tmp_path / "out"
    args = [a.format(**{k: str(v) for k, v in odd_paths.items()}) for a in args]
    # --out first, so that a refused option can never send work to the real results/ folder
    command = ["bash", str(ROOT / "run_all.sh"), "--out", str(out), *args]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stderr
    assert not out.exists()  # refused before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_run_all_refuses_cuda_without_a_gpu(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--out", str(tmp_path / "o"),
                             "--device", "cuda"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no CUDA GPU is visible" in result.stderr


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
    assert "yaml.safe_load" in (ROOT / "run_all.sh").read_text()
    assert "yaml.load(" not in (ROOT / "run_all.sh").read_text()
