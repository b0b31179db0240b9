"""Tests of usae_checkpoint: save / load, resumable training, checksums, refusals."""
import os

import pytest
import torch

import usae_checkpoint as ckpt
import usae_core as core
from test_core import DIMS, tiny_batches


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
    uninterrupted = core.train(straight, batches, steps, **common)

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
