"""Tests of usae_stream: co-indexed, seeded, bounded-shuffle token batches extracted on the fly,
seekable for resume, and training end to end on them.

The fake backbones (conftest) see position-coded images: channel 0 of every token is its grid
position and channel 1 the image's identity (index + 1), so every row says where it came from.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import usae_cache_files
import usae_checkpoint
import usae_core
import usae_images
from conftest import FakeBackbone, build_pair, fake_pair, run_ranks, write_images
from usae_stream import StreamConfig, TokenStream

TOKENS = 60
N_IMAGES, BROKEN = 10, 3  # image 3 is not an image


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("stream"), N_IMAGES, broken=BROKEN)


def stream(folder, **options) -> TokenStream:
    options = {"batch_size": 50, "tokens_per_image": TOKENS, "buffer_images": 4, "workers": 0,
               "forward_images": 3, **options}
    return TokenStream(fake_pair(), folder, StreamConfig(**options))


def origins(batch) -> np.ndarray:
    """(image index, grid position) of each row, read from both models (which must agree)."""
    coded = [np.rint(batch[name][:, :2].numpy()).astype(int) for name in ("alpha", "beta")]
    assert (coded[0] == coded[1]).all(), "row i is not the same token in every model"
    return np.stack([coded[0][:, 1] - 1, coded[0][:, 0]], axis=1)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def same(a, b) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b, strict=True))


def test_rows_are_co_indexed_and_keep_the_caches_positions(folder):
    s = stream(folder)
    batches = take(iter(s), 11)  # 9 usable images x 60 tokens = 540 rows = 10.8 batches
    assert all(b[n].shape == (50, w) and b[n].dtype == torch.float32
               for b in batches for n, w in s.widths.items())
    rows = np.concatenate([origins(b) for b in batches])[:540]
    expected = {(i, int(p)) for i in range(N_IMAGES) if i != BROKEN
                for p in usae_cache_files.token_positions(0, i, 196, TOKENS)}
    assert len({tuple(r) for r in rows.tolist()}) == 540  # each token once per epoch
    assert {tuple(r) for r in rows.tolist()} == expected
    assert s.rows_per_epoch == 540 and s.batches_per_epoch == 10.8
    assert list(s.skipped) == [BROKEN] and "cannot decode" in s.skipped[BROKEN]["reason"]


def test_stream_values_equal_the_cache_rows(folder, tmp_path):
    cache = build_pair(folder, tmp_path / "cache", batch_size=3)
    s = stream(folder, batch_size=540, buffer_images=N_IMAGES)  # one chunk, one batch: an epoch
    batch = next(iter(s))
    where = {(int(i), int(p)): r for r, (i, p) in
             enumerate(zip(cache.image_of_row(), cache.position_of_row()))}
    rows = [where[tuple(o)] for o in origins(batch).tolist()]
    for name in s.names:
        assert np.array_equal(batch[name].numpy(), cache.arrays[name][rows].astype(np.float32))


def test_the_shuffle_is_bounded_to_a_chunk_of_images(tmp_path):
    clean = write_images(tmp_path / "clean", 6)
    s = stream(clean, batch_size=40, buffer_images=2)  # 3 chunks of 120 rows = 3 batches each
    batches = take(iter(s), 18)  # two epochs
    for n, batch in enumerate(batches):
        epoch, chunk = divmod(n // 3, 3)
        members = set(s._chunk_images(epoch, chunk).tolist())
        assert set(origins(batch)[:, 0].tolist()) == members  # its chunk's images, no others
    # Where a chunk's rows do not fill whole batches, a batch straddles two consecutive chunks.
    s = stream(clean, batch_size=50, buffer_images=2)
    chunk_of = {i: c for c in range(3) for i in s._chunk_images(0, c).tolist()}
    for batch in take(iter(s), 7):  # 350 of the epoch's 360 rows
        chunks = sorted({chunk_of[i] for i in origins(batch)[:, 0].tolist()})
        assert chunks in ([0], [1], [2], [0, 1], [1, 2])


def test_same_seed_same_batches_another_seed_others(folder):
    first = take(iter(stream(folder)), 4)
    assert same(first, take(iter(stream(folder)), 4))
    assert same(first, take(iter(stream(folder, workers=2, forward_images=7)), 4))
    other = take(iter(stream(folder, seed=1)), 4)
    assert not torch.equal(first[0]["alpha"], other[0]["alpha"])
    # A later epoch is another order of the same tokens.
    epochs = take(iter(stream(folder, batch_size=60)), 18)  # 540 rows: 9 batches per epoch
    one, two = (np.concatenate([origins(b) for b in half]) for half in (epochs[:9], epochs[9:]))
    assert sorted(map(tuple, one.tolist())) == sorted(map(tuple, two.tolist()))
    assert not np.array_equal(one, two)


@pytest.mark.parametrize("step", [0, 3, 10, 11, 25])
def test_iter_from_equals_skipping(folder, tmp_path, step):
    full = take(iter(stream(folder)), step + 3)[step:]
    assert same(full, take(stream(folder).iter_from(step), 3))  # no record: extracts to learn
    record = tmp_path / "stream.json"
    take(stream(folder, record=record).iter_from(step + 3), 1)  # tries the images, records them
    resumed = stream(folder, record=record)
    assert same(full, take(resumed.iter_from(step), 3))
    assert resumed.chunks_extracted <= 2, "resume ran the backbones over skipped chunks"
    recorded = json.loads(record.read_text())["skipped"]
    assert resumed.skipped == {item["index"]: {"path": item["path"], "reason": item["reason"]}
                               for item in recorded}


def test_bad_input_is_refused_with_a_clear_error(folder, tmp_path):
    for bad in ({"batch_size": 1}, {"buffer_images": 0}, {"workers": -1}, {"seed": -1},
                {"tokens_per_image": 0}, {"forward_images": 0}, {"device": "tpu"},
                {"record": tmp_path}):
        with pytest.raises(ValueError):
            StreamConfig(**bad)
    with pytest.raises(ValueError, match="within 1..196"):
        stream(folder, tokens_per_image=197)
    with pytest.raises(ValueError, match="distinct"):
        TokenStream([FakeBackbone("a", 8), FakeBackbone("a", 8)], folder)
    odd = FakeBackbone("b", 8)
    odd.grid = 7
    with pytest.raises(ValueError, match="one token grid"):
        TokenStream([FakeBackbone("a", 8), odd], folder)
    with pytest.raises(ValueError, match="at least one backbone"):
        TokenStream([], folder)
    with pytest.raises(ValueError, match="empty"):
        TokenStream(fake_pair(), usae_images.ImageSet(folder, (), ()))
    with pytest.raises(TypeError, match="StreamConfig"):
        TokenStream(fake_pair(), folder, {"batch_size": 8})
    record = tmp_path / "r.json"
    take(stream(folder, record=record), 1)
    with pytest.raises(ValueError, match="another stream"):
        stream(folder, record=record, seed=5)
    all_bad = write_images(tmp_path / "bad", 1, broken=0)
    with pytest.raises(ValueError, match="no image"):
        next(iter(stream(all_bad)))


def test_statistics_are_the_caches(folder, tmp_path):
    clean = write_images(tmp_path / "clean", 6)
    cache = build_pair(clean, tmp_path / "cache", stats_sample=4)
    stats = stream(clean).statistics(sample_images=4)
    for name, (mean, std) in cache.standardization.items():
        assert stats[name] == pytest.approx((mean, std), rel=1e-12)


def photos(shared_data_dir, n=4) -> usae_images.ImageSet:
    images = usae_images.list_images(shared_data_dir / "imagenet-200x5")
    return usae_images.ImageSet(images.root, images.paths[:n], images.labels[:n])


class Interrupted(Exception):
    pass


class StopsAfter:
    """The stream, killed after ``count`` batches of this process (a pre-emption)."""

    def __init__(self, stream, count):
        self.stream, self.count = stream, count

    def iter_from(self, step):
        for n, batch in enumerate(self.stream.iter_from(step)):
            if n == self.count:
                raise Interrupted
            yield batch


def test_training_on_a_stream_of_photos_end_to_end_and_resumes_exactly(shared_data_dir, tmp_path):
    images = photos(shared_data_dir)
    options = {"batch_size": 64, "tokens_per_image": 32, "buffer_images": 2, "workers": 1}

    def run(batches, path, steps=12):
        model = usae_core.USAE({"alpha": 8, "beta": 12}, n_concepts=16, k=2, seed=0)
        result = usae_checkpoint.train(model, batches, steps, seed=0, lr=0.01, log_every=4,
                                       progress=False, checkpoint_path=path, checkpoint_every=4)
        return model, result

    config = StreamConfig(**options, record=tmp_path / "a.stream.json")
    model, result = run(TokenStream(fake_pair(), images, config), tmp_path / "a.safetensors")
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert all(row["dictionary_cosine_to_init"][n] < 1 for row in result.history[1:]
               for n in model.names)

    config = StreamConfig(**options, record=tmp_path / "b.stream.json")
    with pytest.raises(Interrupted):  # killed at step 10; the step-8 checkpoint remains
        run(StopsAfter(TokenStream(fake_pair(), images, config), 10), tmp_path / "b.safetensors")
    fresh = TokenStream(fake_pair(), images, config)  # a new process: reads the record
    resumed, _ = run(fresh, tmp_path / "b.safetensors")
    # 128 rows an epoch, 2 chunks of 64: steps 8..11 are 4 chunks, and none before them is run.
    assert fresh.chunks_extracted == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# ---- two gloo processes: every rank runs the same stream, usae_distributed slices it ----------

DDP_STEPS = 6


def ddp_model():
    model = usae_core.USAE({"alpha": 8, "beta": 12}, n_concepts=16, k=2, seed=0)
    for pair in model.pairs.values():  # its gradient is rounding noise (see test_distributed)
        pair.linear.bias.requires_grad_(False)
    return model


def ddp_stream(images, out):
    return stream(images, batch_size=64, record=Path(out) / "stream.json")


def ddp_worker(out, images):
    import usae_distributed as ud

    ctx = ud.init()
    model = ddp_model()
    ud.train(model, ddp_stream(images, out), DDP_STEPS, 0, lr=0.01, progress=False)
    torch.save(model.state_dict(), Path(out) / f"rank{ctx.rank}.pt")
    ud.close()


@pytest.mark.distributed
def test_two_ranks_on_one_stream_train_as_one_process(folder, tmp_path):
    run_ranks([__file__, str(tmp_path), str(folder)], tmp_path, 2)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected = ddp_model()
    usae_core.train(expected, ddp_stream(folder, tmp_path / "one"), DDP_STEPS, 0, lr=0.01,
                    progress=False)
    for key, value in expected.state_dict().items():
        assert torch.equal(states[0][key], states[1][key]), key
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert json.loads((tmp_path / "stream.json").read_text())["skipped"][0]["index"] == BROKEN


if __name__ == "__main__":  # one rank of the two-process run above
    ddp_worker(sys.argv[1], sys.argv[2])
