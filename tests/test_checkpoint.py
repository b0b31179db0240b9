"""Tests of usae_checkpoint: save / load (files and shared folders), resumable training,
checksums, refusals, training killed, failing to write, or resumed from a damaged checkpoint."""
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import usae_checkpoint as ckpt
import usae_core as core
import usae_io
import usae_synthetic as synthetic
from conftest import ROOT, fail_on, flip, kill_when, lines, run_to_end, truncate
from test_core import DIMS, tiny_batches
from test_io import holder


def test_save_load_gives_identical_outputs(tmp_path):
    model = core.USAE(DIMS, n_concepts=16, k=3, seed=0)
    core.train(model, tiny_batches(), 5, seed=0, lr=0.05, progress=False)
    path = tmp_path / "usae.safetensors"
    ckpt.save(model, path)
    loaded = ckpt.load(path)
    assert loaded.config() == model.config()
    assert loaded.standardization() == model.standardization()
    acts = tiny_batches(1, seed=9)[0]
    model.eval()
    for name in DIMS:
        codes = model.encode(name, acts[name])
        assert torch.equal(loaded.encode(name, acts[name]), codes)
        for target in DIMS:
            assert torch.equal(loaded.decode(target, codes), model.decode(target, codes))
    header = ckpt.read_header(path)
    assert header["model"] == {"dims": DIMS, "n_concepts": 16, "k": 3}
    assert header["library_version"] == core.__version__
    assert set(header["standardization"]) == set(DIMS)


def test_training_checkpoint_records_the_run(tmp_path):
    path = tmp_path / "run.safetensors"
    ckpt.train(core.USAE(DIMS, 16, 3, seed=0), tiny_batches(), 4, seed=7, progress=False,
               checkpoint_path=str(path), loss="mse", schedule="released")
    training = ckpt.read_header(path)["training"]
    assert training["step"] == 4 and training["seed"] == 7 and training["total_steps"] == 4
    assert training["config"]["loss"] == "mse"
    assert training["config"]["schedule"] == "released"
    assert sum(training["updates"].values()) == 4


def test_a_second_process_training_into_the_checkpoint_is_refused_until_the_holder_is_gone(
        tmp_path):
    path = tmp_path / "usae.safetensors"
    lock = tmp_path / "usae.safetensors.lock"

    def run(seed):
        return ckpt.train(core.USAE(DIMS, 16, 3, seed=seed), tiny_batches(), 4, seed=seed,
                          progress=False, checkpoint_path=path, resume=False)

    run(0)
    before, process = path.read_bytes(), holder(lock)
    try:
        with pytest.raises(usae_io.BusyError, match=f"process {process.pid} on .* has been "
                                                    "holding .* since .* Wait for it"):
            run(1)
        assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path, lock]
    finally:
        process.kill()  # SIGKILL: its lock stays behind and must not block the next run
        process.wait()
    assert lock.exists()
    run(1)
    assert not lock.exists() and path.read_bytes() != before


class Interrupted(Exception):
    pass


def interrupted_after(batches, n):
    for index, batch in enumerate(batches * 10):
        if index == n:
            raise Interrupted
        yield batch


@pytest.mark.parametrize("options", [{}, {"schedule": "released", "update": "all_decoders"},
                                     {"dictionary_init": "tokens", "encoder_init": "transpose",
                                      "loss": "mse", "sparse_decode": True}])
def test_resumed_training_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, options):
    batches = tiny_batches(5)
    steps, common = 23, dict(seed=3, lr=0.02, progress=False, log_every=4, **options)
    straight = core.USAE(DIMS, 16, 3, seed=0)
    uninterrupted = ckpt.train(straight, batches, steps, **common)

    path = tmp_path / "ckpt.safetensors"
    interrupted = core.USAE(DIMS, 16, 3, seed=0)
    with pytest.raises(Interrupted):
        ckpt.train(interrupted, interrupted_after(batches, 16), steps, checkpoint_path=str(path),
                   checkpoint_every=5, **common)
    assert ckpt.read_header(path)["training"]["step"] == 15

    resumed = core.USAE(DIMS, 16, 3, seed=123)  # its own weights are replaced by the checkpoint
    result = ckpt.train(resumed, batches, steps, checkpoint_path=str(path), checkpoint_every=5,
                        **common)
    assert result.step == steps
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    # the history survives the kill: every logged step once, movement measured from the same start
    assert [row["step"] for row in result.history] == [4, 8, 12, 16, 20, 23]
    assert result.history[-1]["dictionary_cosine_to_init"] == \
        uninterrupted.history[-1]["dictionary_cosine_to_init"]


def test_resume_asks_a_seekable_loader_for_the_stream_from_the_checkpoint(tmp_path):
    class Loader:
        def __init__(self, stop_at=None):
            self.starts, self.stop_at = [], stop_at

        def iter_from(self, step):
            self.starts.append(step)
            while step != self.stop_at:
                yield tiny_batches(1, seed=step)[0]
                step += 1
            raise Interrupted

    path = tmp_path / "ckpt.safetensors"
    first, second = Loader(stop_at=4), Loader()
    with pytest.raises(Interrupted):
        ckpt.train(core.USAE(DIMS, 16, 3, seed=0), first, 6, progress=False,
                   checkpoint_path=str(path), checkpoint_every=2)
    ckpt.train(core.USAE(DIMS, 16, 3, seed=0), second, 6, progress=False,
               checkpoint_path=str(path))
    assert first.starts == [0] and second.starts == [4]


def test_a_failed_write_keeps_the_old_checkpoint_and_leaves_no_temporary_file(tmp_path,
                                                                              monkeypatch):
    path = tmp_path / "model.safetensors"
    model = core.USAE(DIMS, 16, 3, seed=0)
    ckpt.save(model, path)
    original = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match=str(tmp_path)):
        ckpt.save(core.USAE(DIMS, 16, 3, seed=1), path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_checkpoints_are_safetensors_with_a_json_header_and_no_pickle(tmp_path):
    path = tmp_path / "model.safetensors"
    ckpt.save(core.USAE(DIMS, 16, 3, seed=0), path)
    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and b"usae" in raw[8:8 + header_length]
    assert b"\x80\x04" not in raw[:2] and not raw.startswith(b"PK")  # no pickle, no zip


def bad_batch(kind):
    batch = tiny_batches(1)[0]
    if kind == "tokens":
        batch["b"] = batch["b"][:-1]
    elif kind == "nan":
        batch["c"][3, 2] = float("nan")
    elif kind == "inf":
        batch["a"][0, 0] = float("inf")
    elif kind == "width":
        batch["a"] = torch.randn(32, 7)
    elif kind == "missing":
        del batch["c"]
    elif kind == "unknown":
        batch["d"] = torch.randn(32, 3)
    return batch


@pytest.mark.parametrize("kind, message", [
    ("tokens", "different token counts"), ("nan", "NaN or inf.*'c'"), ("inf", "NaN or inf.*'a'"),
    ("width", r"shape \(tokens, 6\)"), ("missing", r"missing \['c'\]"),
    ("unknown", r"unknown \['d'\]")])
def test_bad_batches_are_refused_and_earlier_work_is_kept(tmp_path, kind, message):
    path = tmp_path / "ckpt.safetensors"
    batches = tiny_batches(3) + [bad_batch(kind)]
    with pytest.raises(ValueError, match=message):
        ckpt.train(core.USAE(DIMS, 16, 3, seed=0), batches, 8, progress=False,
                   checkpoint_path=str(path))
    assert ckpt.read_header(path)["training"]["step"] == 3


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    batches = tiny_batches()
    ckpt.train(core.USAE(DIMS, 16, 3, seed=0), batches, 2, progress=False,
               checkpoint_path=str(path))
    with pytest.raises(ckpt.CheckpointError, match="holds a USAE"):
        ckpt.train(core.USAE(DIMS, 16, 4), batches, 4, progress=False, checkpoint_path=str(path))
    with pytest.raises(ckpt.CheckpointError, match="'loss': \\('l1_aux', 'mse'\\)"):
        ckpt.train(core.USAE(DIMS, 16, 3), batches, 2, progress=False, checkpoint_path=str(path),
                   loss="mse")
    with pytest.raises(ckpt.CheckpointError, match="'seed'"):
        ckpt.train(core.USAE(DIMS, 16, 3), batches, 2, seed=5, progress=False,
                   checkpoint_path=str(path))


def test_unreadable_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    ckpt.save(core.USAE(DIMS, 16, 3, seed=0), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError, match="damaged|not a readable"):
        ckpt.load(path)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load(tmp_path / "missing.safetensors")


def test_an_altered_checkpoint_byte_is_detected(tmp_path):
    path = tmp_path / "model.safetensors"
    ckpt.save(core.USAE(DIMS, 16, 3, seed=0), path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # one bit of the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="fails its checksum"):
        ckpt.load(path)


def test_written_files_get_a_normal_mode(tmp_path):
    path = tmp_path / "model.safetensors"
    ckpt.save(core.USAE(DIMS, 16, 3, seed=0), path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------------------------
# Reliability: a killed or failing run loses at most one checkpoint interval, and a damaged,
# altered or malicious checkpoint is refused. These runs use two models of their own.


TWO_MODELS = {"a": 12, "b": 16}


def planted_batches(n_tokens: int = 128, batch_tokens: int = 32) -> list[dict]:
    """Batches of 8 planted concepts (2 active per token) seen by :data:`TWO_MODELS`."""
    return synthetic.token_batches(synthetic.planted_concepts(TWO_MODELS, 8, 2, n_tokens).acts,
                                   batch_tokens)


TRAIN = """
import sys, time
sys.path.insert(0, {root!r})
import torch
import usae_checkpoint, usae_core, usae_synthetic

checkpoint, log, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.set_num_threads(1)
data = usae_synthetic.planted_concepts({dims!r}, 16, 2, 2048, seed=0)
batches = usae_synthetic.token_batches(data.acts, 128, seed=0)

class Stream:  # batch i of the run is batches[i % len]; logs each step as it starts
    def iter_from(self, step):
        while True:
            with open(log, "a") as handle:
                handle.write(f"{{step}}\\n")
            time.sleep(delay)
            yield batches[step % len(batches)]
            step += 1

usae_checkpoint.train(usae_core.USAE({dims!r}, 32, 2, seed=0), Stream(), {steps}, seed=3,
                      lr=1e-2, progress=False, checkpoint_path=checkpoint, checkpoint_every={every})
"""
STEPS, EVERY = 60, 7


def uninterrupted_training() -> dict[str, torch.Tensor]:
    data = synthetic.planted_concepts(TWO_MODELS, 16, 2, 2048, seed=0)
    batches = synthetic.token_batches(data.acts, 128, seed=0)
    model = core.USAE(TWO_MODELS, 32, 2, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess: the same float summation order
    try:
        core.train(model, batches, STEPS, seed=3, lr=1e-2, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model.state_dict()


def test_killed_training_resumes_to_the_uninterrupted_model(tmp_path):
    """SIGKILLs at random steps lose at most the steps since the last checkpoint, the file at
    the checkpoint path is always a complete checkpoint, and the resumed run ends with every
    tensor equal to an uninterrupted run with the same seed."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN.format(root=str(ROOT), dims=TWO_MODELS, steps=STEPS, every=EVERY))
    checkpoint, log = tmp_path / "usae.safetensors", tmp_path / "log"
    rng = np.random.default_rng(11)

    def command(delay):
        return [sys.executable, str(script), str(checkpoint), str(log), str(delay)]

    for _ in range(2):
        log.unlink(missing_ok=True)
        status = kill_when(command(0.1), lambda: len(lines(log)) > 1,
                           delay=rng.uniform(0, 1.2))
        assert status == -signal.SIGKILL
        started = int(lines(log)[-1])  # steps done when the last logged one began
        saved = ckpt.read_header(checkpoint)["training"]["step"] if checkpoint.exists() else 0
        assert started // EVERY * EVERY <= saved <= started + 1 < STEPS
        if saved:
            ckpt.load(checkpoint)  # complete and readable, never half-written

    run_to_end(command(0.0))
    assert ckpt.read_header(checkpoint)["training"]["step"] == STEPS
    resumed, expected = ckpt.load(checkpoint).state_dict(), uninterrupted_training()
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_a_killed_checkpoint_write_leaves_no_temporary_behind_after_resuming(tmp_path):
    checkpoint = tmp_path / "usae.safetensors"
    stale = tmp_path / ".usae.safetensors.k1ll3d.tmp"  # atomic_write's naming
    stale.write_bytes(b"half a checkpoint")
    batches = planted_batches(256, 64)
    ckpt.train(core.USAE(TWO_MODELS, 16, 2, seed=0), batches, 2, progress=False,
               checkpoint_path=str(checkpoint))
    assert not stale.exists()


@pytest.mark.parametrize("module, name, code", [(os, "replace", errno.EROFS),
                                                (tempfile, "mkstemp", errno.EACCES),
                                                (ckpt, "save_file", errno.ENOSPC)])
def test_a_failed_checkpoint_write_keeps_the_last_one_and_training_resumes(
        module, name, code, tmp_path, monkeypatch):
    checkpoint = tmp_path / "usae.safetensors"
    batches = planted_batches(1024, 64)

    def run():
        return ckpt.train(core.USAE(TWO_MODELS, 16, 2, seed=0), batches, 12, seed=1, progress=False,
                          checkpoint_path=str(checkpoint), checkpoint_every=4)

    fail_on(monkeypatch, module, name, code, after=1)  # the second checkpoint, at step 8
    with pytest.raises(OSError) as error:
        run()
    assert error.value.errno == code and str(checkpoint) in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["usae.safetensors"]
    assert ckpt.read_header(checkpoint)["training"]["step"] == 4
    monkeypatch.undo()
    resumed = run().model.state_dict()
    checkpoint.unlink()
    expected = run().model.state_dict()
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)


def tiny_checkpoint(path: Path) -> None:
    batches = planted_batches(256, 64)
    ckpt.train(core.USAE(TWO_MODELS, 16, 3, seed=0), batches, 8, progress=False,
               checkpoint_path=str(path))


def test_a_truncated_checkpoint_is_refused_when_training_resumes(tmp_path):
    path = tmp_path / "usae.safetensors"
    tiny_checkpoint(path)
    truncate(path, 64)
    batches = planted_batches(256, 64)
    with pytest.raises(ckpt.CheckpointError, match="restore it from a copy"):
        ckpt.train(core.USAE(TWO_MODELS, 16, 3, seed=0), batches, 12, progress=False,
                   checkpoint_path=str(path))


@pytest.mark.parametrize("where", ["tensor byte", "header value"])
def test_an_altered_checkpoint_is_refused(where, tmp_path):
    path = tmp_path / "usae.safetensors"
    tiny_checkpoint(path)
    if where == "tensor byte":
        flip(path, path.stat().st_size - 3)  # inside the last tensor's data
    else:  # same length, still valid JSON, loads into a model of another k
        path.write_bytes(path.read_bytes().replace(b'\\"k\\": 3', b'\\"k\\": 4', 1))
        assert ckpt.read_header(path)["model"]["k"] == 4
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(path)


def test_a_pickle_planted_in_a_checkpoint_is_refused(payload, tmp_path):
    marker, data = payload
    checkpoint = tmp_path / "usae.safetensors"
    checkpoint.write_bytes(data)
    for load in (ckpt.load, ckpt.read_header):
        with pytest.raises(ckpt.CheckpointError):
            load(checkpoint)
    batches = planted_batches(256, 64)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.train(core.USAE(TWO_MODELS, 16, 2), batches, 2, progress=False,
                   checkpoint_path=str(checkpoint))
    assert not marker.exists()


@pytest.mark.parametrize("options, message", [
    ({"steps": -1}, "steps must be a positive integer"),
    ({"steps": 2.5}, "steps must be a positive integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"checkpoint_every": -1}, "checkpoint_every must be an integer >= 0"),
    ({"checkpoint_every": 2.5}, "checkpoint_every must be an integer >= 0"),
    ({"grad_clip": -1.0}, "grad_clip must be a finite number >= 0"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"final_lr": -1e-6}, "final_lr must be a finite number >= 0"),
    ({"aux_weight": float("nan")}, "aux_weight must be a finite number"),
    ({"precision": "fp16"}, "precision='fp16' is not one of"),
    ({"log_every": True}, "log_every must be a positive integer"),
    ({"device": "tpu"}, "device"),
    ({"warmup_steps": True}, "warmup_steps"),
    ({"resume": "yes"}, "resume"),
    ({"checkpoint_path": 123}, "checkpoint_path")])
def test_train_refuses_nonsense_before_any_step(options, message, tmp_path):
    options = {"steps": 2, "seed": 0, "progress": False, **options}
    model = core.USAE(TWO_MODELS, 16, 2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        ckpt.train(model, planted_batches(), options.pop("steps"), options.pop("seed"), **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------
# Shared folders: model.safetensors + config.json + README.md, as model hubs lay them out.


def assert_same_model(a: core.USAE, b: core.USAE) -> None:
    """Identical state dicts, and identical codes and reconstructions on fresh activations."""
    assert a.config() == b.config() and a.names == b.names
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    generator = torch.Generator().manual_seed(5)
    for name, width in a.dims.items():
        acts = 2 * torch.randn(40, width, generator=generator)
        codes = a.encode(name, acts)
        assert torch.equal(b.encode(name, acts), codes)
        for target in a.names:
            assert torch.equal(b.decode(target, codes), a.decode(target, codes))


def test_a_folder_holds_the_checkpoint_its_configuration_and_a_model_card(tmp_path):
    model = core.USAE(DIMS, n_concepts=16, k=3, seed=0)
    core.train(model, tiny_batches(), 5, seed=0, lr=0.05, progress=False)
    folder = tmp_path / "usae-abc"
    ckpt.save(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                        "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    header = ckpt.read_header(folder)
    assert header == ckpt.read_header(folder / "model.safetensors")
    assert config == {k: v for k, v in header.items() if k != "sha256"}
    assert config["model"] == model.config() and config["library_version"] == core.__version__
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")  # the hub's metadata block
    for name, width in DIMS.items():
        assert f"| `{name}` | {width} |" in card
    assert "n_concepts" not in card and "16 shared concepts" in card and "k = 3" in card
    assert "usae_checkpoint.load(" in card
    assert_same_model(model, ckpt.load(folder))
    downloaded = shutil.copytree(folder, tmp_path / "downloaded")  # as a hub download gives it
    assert_same_model(model, ckpt.load(downloaded))
    ckpt.save(model, folder)  # saving again over the same folder
    assert_same_model(model, ckpt.load(folder))


def test_a_folder_card_shows_the_runs_numbers(tmp_path):
    model = core.USAE(DIMS, 16, 3, seed=0)
    metrics = {"r2_paper": [0.81, np.float64(0.52), 0.4], "k": 3, "preset": "offline",
               "training_final": {"loss": torch.tensor(1.23456), "r2": {"a": {"a": 0.9}}},
               "firing_entropy": list(range(100))}
    ckpt.save(model, tmp_path / "with", metrics=metrics)
    card = (tmp_path / "with" / "README.md").read_text()
    assert "| r2_paper | 0.81, 0.52, 0.4 |" in card and "| training_final.loss | 1.235 |" in card
    assert "| preset | offline |" in card and "firing_entropy" not in card
    written = json.loads((tmp_path / "with" / "metrics.json").read_text())
    assert written["firing_entropy"] == list(range(100))
    # a run folder that already holds metrics.json (usae_analysis writes one) gets them too
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"r2_paper": [0.7, 0.6, 0.5]}))
    ckpt.save(model, run)
    assert "| r2_paper | 0.7, 0.6, 0.5 |" in (run / "README.md").read_text()
    ckpt.save(model, tmp_path / "without")
    assert "metric" not in (tmp_path / "without" / "README.md").read_text()


def test_folder_paths_that_cannot_be_used_are_refused(tmp_path):
    model = core.USAE(DIMS, 16, 3, seed=0)
    with pytest.raises(ValueError, match="pass a folder path"):
        ckpt.save(model, tmp_path / "one.safetensors", metrics={"r2": 0.5})
    with pytest.raises(ValueError, match="metrics must be a mapping"):
        ckpt.save(model, tmp_path / "folder", metrics=[0.5])
    with pytest.raises(ValueError, match="metrics must be a mapping"):
        ckpt.save(model, tmp_path / "folder", metrics={"model": model})
    with pytest.raises(ValueError, match="metrics must be a mapping"):
        ckpt.save(model, tmp_path / "folder", metrics={"r2": torch.ones(3)})
    (tmp_path / "notes").write_text("a file")
    with pytest.raises(ValueError, match="is a file"):
        ckpt.save(model, tmp_path / "notes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load(tmp_path / "empty")


def test_a_failed_folder_write_keeps_the_old_model(tmp_path, monkeypatch):
    folder = tmp_path / "shared"
    ckpt.save(core.USAE(DIMS, 16, 3, seed=0), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    fail_on(monkeypatch, ckpt, "save_file", errno.ENOSPC)
    with pytest.raises(OSError, match="shared"):
        ckpt.save(core.USAE(DIMS, 16, 3, seed=1), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
