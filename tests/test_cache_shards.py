"""Tests of usae_cache_shards: two gloo processes on CPU build one activation cache together,
byte-identical to a one-process build, and resume per rank after a failure or a SIGKILL.

The two-process tests start this file as a script twice, with the environment torchrun would set
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); each rank calls ``usae_cache.build_cache`` with the
fake backbones of conftest and writes what happened to ``rank<r>.json`` (:func:`worker`).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import usae_cache
import usae_cache_files
import usae_cache_shards as shards
from conftest import (FakeBackbone, fake_pair, folder_bytes, run_ranks as run_to_the_end,
                      start_ranks, stop_ranks, write_images)
from test_io import holder

ROOT = Path(__file__).resolve().parents[1]
WORLD, BATCH, N_IMAGES, BROKEN = 2, 2, 11, (3, 7)  # one unreadable image in each rank's range
OPTIONS = {"batch_size": BATCH, "tokens_per_image": 60, "stats_sample": 4, "progress": False,
           "workers": 1}


# ---- what each rank runs ---------------------------------------------------------------------


def worker(images: str, out: str, results: str, mode: str) -> None:
    """One rank: build the cache of ``images`` in ``out``; ``mode`` injects a fault."""
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()

    class Faulty(FakeBackbone):
        def forward(self, pixels):
            if mode == "slow":  # time for the test to SIGKILL the job mid-way
                time.sleep(0.3)
            if mode == "crash-rank1" and rank == 1 and self.calls == 1:  # 2nd batch of rank 1
                raise RuntimeError("simulated failure of rank 1's backbone")
            return super().forward(pixels)

    if mode == "crash-assembly" and rank == 0:  # copy 4 images at a time, fail in shard 1
        shards._COPY_IMAGES = 4
        save, calls = usae_cache_files.save_batch, []

        def failing(folder, *args, **kwargs):
            if Path(folder) == Path(out):
                calls.append(folder)
                if len(calls) == 4:
                    raise OSError("simulated failure during the assembly")
            return save(folder, *args, **kwargs)

        usae_cache_files.save_batch = failing
    backbones = [Faulty("alpha", 8, 1), Faulty("beta", 12, 2)]
    options = {**OPTIONS, "batch_size": 4} if mode == "other-batch" and rank == 1 else OPTIONS
    outcome = {}
    try:
        cache = usae_cache.build_cache(backbones, images, out, **options)
        outcome["n_tokens"] = cache.n_tokens
    except BaseException as error:  # reported to the test, which decides
        outcome["error"] = f"{type(error).__name__}: {error}"
    outcome["calls"] = [bb.calls for bb in backbones]
    (Path(results) / f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


# ---- launching two ranks -----------------------------------------------------------------------


def start(images: Path, out: Path, results: Path, mode: str) -> list[subprocess.Popen]:
    return start_ranks([__file__, str(images), str(out), str(results), mode], results, WORLD)


def run_ranks(images: Path, out: Path, results: Path, mode: str = "plain") -> list[dict]:
    """Both ranks to the end (or 120 s); what each rank reported."""
    run_to_the_end([__file__, str(images), str(out), str(results), mode], results, WORLD)
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(WORLD)]


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = write_images(tmp_path_factory.mktemp("images"), N_IMAGES, broken=BROKEN[0])
    (folder / f"img_{BROKEN[1]:03d}.png").write_bytes(b"not an image either")
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The cache built by one process, without a process group."""
    folder = tmp_path_factory.mktemp("reference") / "cache"
    usae_cache.build_cache(fake_pair(), images, folder, **OPTIONS)
    return folder


def assert_same_as_one_process(out: Path, reference: Path) -> None:
    assert not (out / shards.SHARDS_DIR).exists()  # the shards are gone, and the lock
    assert folder_bytes(out) == folder_bytes(reference)  # arrays, index files and cache.json
    cache = usae_cache.open_cache(out, verify="full")
    assert [item["index"] for item in cache.metadata["skipped"]["images"]] == list(BROKEN)


# ---- the tests ---------------------------------------------------------------------------------


def test_plan_cuts_whole_batches_in_image_order():
    assert shards.plan(11, 2, 2) == [(0, 6), (6, 11)]
    assert shards.plan(10, 2, 3) == [(0, 2), (2, 6), (6, 10)]
    assert shards.plan(3, 4, 2) == [(0, 0), (0, 3)]  # one batch: one rank has nothing to do
    for n, batch, world in [(1, 1, 1), (97, 5, 4), (1000, 16, 7), (5, 16, 8)]:
        ranges = shards.plan(n, batch, world)
        assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(start % batch == 0 and start <= stop for start, stop in ranges)


def test_without_a_process_group_nothing_is_sharded():
    assert shards.process_group() is None


@pytest.mark.distributed
def test_two_ranks_build_the_one_process_cache(images, reference, tmp_path):
    out = tmp_path / "cache"
    outcomes = run_ranks(images, out, tmp_path / "run")
    assert all("error" not in o for o in outcomes), outcomes
    # Rank 0: images 0-5 (3 batches, image 3 unreadable); rank 1: 6-10 (3 batches, 7 unreadable).
    assert [o["calls"] for o in outcomes] == [[3, 3], [3, 3]]
    assert outcomes[0]["n_tokens"] == outcomes[1]["n_tokens"] == (N_IMAGES - 2) * 60
    assert_same_as_one_process(out, reference)

    again = run_ranks(images, out, tmp_path / "again")  # complete: opened, nothing computed
    assert [o["calls"] for o in again] == [[0, 0], [0, 0]]


@pytest.mark.distributed
def test_a_failed_rank_stops_every_rank_and_each_resumes_its_own_range(images, reference,
                                                                       tmp_path):
    out = tmp_path / "cache"
    failed = run_ranks(images, out, tmp_path / "failed", "crash-rank1")
    assert failed[1]["error"] == "RuntimeError: simulated failure of rank 1's backbone"
    assert failed[0]["error"].startswith("RuntimeError: rank 1 of 2 failed while extracting")
    assert not (out / "cache.json").exists()
    progress = json.loads((shards.shard_folder(out, 6, 11) / "progress.json").read_text())
    assert progress["images_done"] == 2  # rank 1 saved its first batch

    alone = Path(shutil.copytree(out, tmp_path / "alone"))
    resumed = run_ranks(images, out, tmp_path / "resumed")
    # Rank 0's shard was complete; rank 1 computed its last two batches only.
    assert [o["calls"] for o in resumed] == [[0, 0], [2, 2]]
    assert_same_as_one_process(out, reference)

    # One process finishes it too: from the cache's own progress (nothing assembled yet), the
    # shards ignored and then deleted.
    usae_cache.build_cache(fake_pair(), images, alone, **OPTIONS)
    assert_same_as_one_process(alone, reference)


@pytest.mark.distributed
def test_two_ranks_resume_a_cache_that_one_process_left_unfinished(images, reference,
                                                                   tmp_path):
    class Crashing(FakeBackbone):
        def forward(self, pixels):
            if self.calls == 2:  # third batch: images 0-3 are saved
                raise KeyboardInterrupt("simulated crash")
            return super().forward(pixels)

    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        usae_cache.build_cache([FakeBackbone("alpha", 8, 1), Crashing("beta", 12, 2)], images,
                               out, **OPTIONS)
    assert json.loads((out / "progress.json").read_text())["images_done"] == 4
    resumed = run_ranks(images, out, tmp_path / "resumed")
    # Rank 0's range straddles image 4: extracted whole, only images 4-5 copied.
    assert [o["calls"] for o in resumed] == [[3, 3], [3, 3]]
    assert_same_as_one_process(out, reference)


@pytest.mark.distributed
def test_a_held_lock_or_ranks_that_disagree_stop_every_rank_before_any_work(images, tmp_path):
    out = tmp_path / "cache"
    process = holder(out / usae_cache_files.LOCK_FILE)
    try:
        busy = run_ranks(images, out, tmp_path / "busy")
    finally:
        process.kill()
        process.wait()
    assert busy[0]["error"].startswith(f"BusyError: {out} is in use: process {process.pid}")
    assert busy[1]["error"].startswith("RuntimeError: rank 0 of 2 failed while taking the "
                                       "cache's lock")
    assert [p.name for p in out.iterdir()] == [usae_cache_files.LOCK_FILE]

    other = run_ranks(images, tmp_path / "other", tmp_path / "other-run", "other-batch")
    for outcome in other:
        assert outcome["error"].startswith("ValueError: the ranks called build_cache with "
                                           "different arguments")
        assert outcome["calls"] == [0, 0]


@pytest.mark.distributed
def test_a_failed_assembly_resumes_in_the_middle_of_a_shard(images, reference, tmp_path):
    out = tmp_path / "cache"
    failed = run_ranks(images, out, tmp_path / "failed", "crash-assembly")
    assert failed[0]["error"] == "OSError: simulated failure during the assembly"
    assert failed[1]["error"].startswith("RuntimeError: rank 0 of 2 failed while assembling")
    # Copied: images 0-3, 4-5 (shard 0, then deleted) and 6-9 (shard 1, whose image 7 was
    # skipped: the resumed copy must start at the right row).
    assert json.loads((out / "progress.json").read_text())["images_done"] == 10
    assert not shards.shard_folder(out, 0, 6).exists() and shards.shard_folder(out, 6, 11).exists()

    resumed = run_ranks(images, out, tmp_path / "resumed")
    assert [o["calls"] for o in resumed] == [[0, 0], [0, 0]]
    assert_same_as_one_process(out, reference)


@pytest.mark.distributed
def test_a_killed_job_resumes_byte_identical(images, reference, tmp_path):
    """SIGKILL both ranks (as torchrun stops a job) once rank 1 has saved a batch."""
    out, results = tmp_path / "cache", tmp_path / "killed"
    progress = shards.shard_folder(out, 6, 11) / "progress.json"
    processes = start(images, out, results, "slow")
    try:
        deadline = time.monotonic() + 120
        while not (progress.exists() and json.loads(progress.read_text())["images_done"] >= 2):
            assert all(p.poll() is None for p in processes), "a rank ended before the kill"
            assert time.monotonic() < deadline, "no progress within 120 s"
            time.sleep(0.02)
    finally:
        stop_ranks(processes)
    assert not (out / "cache.json").exists()
    resumed = run_ranks(images, out, tmp_path / "resumed")
    assert resumed[1]["calls"][1] <= 2  # at most rank 1's two last batches were recomputed
    assert_same_as_one_process(out, reference)


if __name__ == "__main__":  # one rank of a two-process run (see start)
    worker(*sys.argv[1:])
