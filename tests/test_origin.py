"""usae_origin: a USAE given with --checkpoint (ours, or the authors' release as its YAML) is
described without its weights, mapped onto the run's models, width-checked, installed once as
<out>/usae.safetensors with no training history, reused on a re-run, and never mixed with a
USAE trained in the same folder; the metrics say it was not trained here."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import usae_checkpoint as ckpt
import usae_core as core
import usae_official as official
import usae_origin as origin
from test_official import N, K, RELEASED_DIMS, write_release

PAPER = ["dinov2", "siglip", "vit"]
RANDOM = ["random:dinov2", "random:siglip", "random:vit"]
KEYS = {"dinov2": "dinov2", "siglip": "siglip", "vit": "vit"}
WIDTHS = {"dinov2": RELEASED_DIMS["DinoV2"], "siglip": RELEASED_DIMS["SigLIP"],
          "vit": RELEASED_DIMS["ViT"]}


@pytest.fixture
def release(tmp_path):
    return write_release(tmp_path / "release")[0]


def ours(path: Path, names=("dinov2", "siglip", "vit"), trained: bool = False) -> Path:
    """A checkpoint of this library over ``names`` (widths of the fake release)."""
    model = core.USAE({n: list(WIDTHS.values())[i] for i, n in enumerate(names)}, N, K, seed=3)
    if trained:
        batches = [{n: torch.randn(64, w) for n, w in model.dims.items()}] * 2
        ckpt.train(model, batches, 2, checkpoint_path=path, checkpoint_every=1, log_every=1)
    else:
        model.set_standardization({n: (0.1, 2.0) for n in model.names})
        ckpt.save(model, path)
    return path


def test_describe_reads_either_kind_without_weights(release, tmp_path):
    given = origin.describe(release)
    assert (given.kind, given.dims, given.n_concepts, given.k) == ("official", RELEASED_DIMS, N, K)
    for path in (ours(tmp_path / "u.safetensors"), tmp_path / "shared"):
        if not path.exists():
            ckpt.save(ckpt.load(tmp_path / "u.safetensors"), path)  # a folder to share
        given = origin.describe(path)
        assert (given.kind, given.dims, given.n_concepts, given.k) == \
            ("checkpoint", dict(zip(PAPER, WIDTHS.values())), N, K)


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing.yaml", "does not exist"),
    (lambda root: (root / "notes.txt").write_text("x") and root / "notes.txt", "no known kind"),
    (lambda root: (root / "folder").mkdir() or root / "folder", "no known kind"),
    (lambda root: (root / "bad.yaml").write_text("a: 1") and root / "bad.yaml",
     "not a configuration of the authors' release"),
])
def test_describe_refuses_naming_the_problem(make, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        origin.describe(make(tmp_path))


def test_describe_refuses_a_release_whose_pth_file_is_missing(release):
    (release.parent / "uni_ViT_checkpoint_29.pth").unlink()
    with pytest.raises(ValueError, match="checkpoint of ViT .* is not at any of"):
        origin.describe(release)


def test_release_names_map_onto_the_paper_backbones_random_or_not(release):
    given = origin.describe(release)
    assert official.OFFICIAL_NAMES == {"DinoV2": "dinov2", "SigLIP": "siglip", "ViT": "vit"}
    assert origin.run_names(given, PAPER, PAPER) == {"SigLIP": "siglip", "DinoV2": "dinov2",
                                                     "ViT": "vit"}
    keys = ["random_dinov2", "random_siglip", "random_vit"]
    assert origin.run_names(given, RANDOM, keys) == {"SigLIP": "random_siglip",
                                                     "DinoV2": "random_dinov2",
                                                     "ViT": "random_vit"}


@pytest.mark.parametrize("backbones, message", [
    (["dinov2_imgfocus_block9", "siglip", "vit"], "model 'DinoV2' .* has no backbone in this run"),
    (["dinov2", "siglip"], "model 'ViT' .* has no backbone"),
    (PAPER + ["mobilenetv2_deepsort"], "backbones \\['mobilenetv2_deepsort'\\] of this run have "
                                       "no model in the release"),
])
def test_release_names_that_do_not_map_are_refused(release, backbones, message):
    with pytest.raises(ValueError, match=message):
        origin.run_names(origin.describe(release), backbones, backbones)


def test_our_checkpoint_must_use_the_run_model_names(tmp_path):
    given = origin.describe(ours(tmp_path / "u.safetensors", names=("a", "b", "c")))
    with pytest.raises(ValueError, match="holds the models \\['a', 'b', 'c'\\], but this run's "
                                         "are \\['dinov2', 'siglip', 'vit'\\]"):
        origin.run_names(given, PAPER, PAPER)


def test_a_width_mismatch_names_the_model_and_both_widths(release):
    given = origin.describe(release)
    with pytest.raises(ValueError, match="model 'DinoV2' .* has width 8, but the backbone "
                                         "'dinov2' gives tokens of width 384"):
        origin.check_widths(given, origin.run_names(given, PAPER, PAPER),
                            {**WIDTHS, "dinov2": 384})


def test_renamed_keeps_every_weight_under_the_new_names(release):
    model = official.import_official(release)
    names = {"SigLIP": "siglip", "DinoV2": "dinov2", "ViT": "vit"}
    copy = origin.renamed(model, names, PAPER)
    assert copy.names == PAPER and copy.standardization()["dinov2"] == \
        model.standardization()["DinoV2"]
    acts = torch.randn(20, RELEASED_DIMS["DinoV2"])
    assert torch.equal(copy.encode("dinov2", acts), model.encode("DinoV2", acts))
    assert torch.equal(copy.dictionary("vit"), model.dictionary("ViT"))


def install(checkpoint, target):
    return origin.install(checkpoint, PAPER, PAPER, WIDTHS, target)


def test_install_imports_once_without_training_and_reuses_on_a_rerun(release, tmp_path):
    target = tmp_path / "out" / "usae.safetensors"
    model = install(release, target)
    assert model.names == PAPER and (model.n_concepts, model.k) == (N, K)
    assert not origin.trained_here(target) and origin.training_history(target) == []
    released = origin.renamed(official.import_official(release),
                              {o: b for o, b in official.OFFICIAL_NAMES.items()}, PAPER)
    assert all(torch.equal(a, b) for a, b in zip(ckpt.load(target).state_dict().values(),
                                                  released.state_dict().values()))
    before = (target.read_bytes(), target.stat().st_mtime_ns)
    again = install(release, target)  # a re-run: the same model, the file untouched
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                  model.state_dict().values()))


def test_install_refuses_to_replace_a_trained_or_another_imported_usae(release, tmp_path):
    trained = ours(tmp_path / "trained" / "usae.safetensors", trained=True)
    assert origin.trained_here(trained)
    with pytest.raises(ValueError, match="trained by an earlier run .* without --checkpoint"):
        install(release, trained)
    other = ours(tmp_path / "other.safetensors")
    target = tmp_path / "out" / "usae.safetensors"
    install(other, target)
    with pytest.raises(ValueError, match="holds another imported USAE"):
        install(release, target)


def test_training_summary_of_an_imported_usae_claims_no_training(release, tmp_path):
    out = tmp_path / "out"
    install(release, out / "usae.safetensors")
    for name, width in WIDTHS.items():  # the independent SAEs are trained as usual
        sae = core.USAE({name: width}, N, K, seed=1)
        ckpt.train(sae, [{name: torch.randn(64, width)}] * 2, 2, log_every=1,
                   checkpoint_path=out / f"sae_{name}.safetensors", checkpoint_every=1)
    exp = SimpleNamespace(folder=out, names=PAPER, checkpoint=str(release))
    summary = origin.training_summary(exp)
    assert summary["usae_trained_here"] is False and summary["usae_checkpoint"] == str(release)
    assert summary["train_steps"] == 0 and summary["training_final"] is None
    assert summary["dictionary_cosine_to_init"] is None
    assert set(summary["independent_dictionary_cosine_to_init"]) == set(PAPER)


def test_take_sizes_makes_the_path_absolute_and_fills_n_and_k(release, monkeypatch):
    monkeypatch.chdir(release.parent)
    exp = SimpleNamespace(checkpoint=release.name, n_concepts=0, k=0)
    origin.take_sizes(exp)
    assert exp.checkpoint == str(release) and os.path.isabs(exp.checkpoint)
    assert (exp.n_concepts, exp.k) == (N, K)
