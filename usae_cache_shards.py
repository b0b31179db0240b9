"""Sharded extraction: the ranks of one ``torchrun`` job build one activation cache together.

``usae_cache.build_cache`` called on every rank of an initialised process group of two or more
processes (:func:`process_group`) hands the build to :func:`build_sharded`; without a process
group nothing here runs. The cache that comes out is byte-identical to the one a single process
builds with the same arguments (arrays, index files and ``cache.json``; the ``build`` record
names rank 0's device). The design, and why:

1. **One contiguous range of images per rank, on batch boundaries** (:func:`plan`). Every batch
   holds the images it holds in one process, so the backbones compute the same numbers.
2. **Each rank extracts its range into its own shard**, ``<cache>/shards/images-<start>-<stop>/``,
   with the one-process build's file layer (``usae_cache_files.open_partial`` and
   ``save_batch``: its own ``progress.json`` and ``.partial`` arrays). Skipped images shift
   rows, so no rank knows in advance where its rows start in the cache: writing each range
   apart and concatenating afterwards needs no agreement on offsets, and a killed rank resumes
   its own range at its last saved batch.
3. **Rank 0 assembles**: it copies the shards' rows in image order into the cache's own
   ``.partial`` arrays with ``save_batch`` (so the cache's ``progress.json`` says what one
   process would have said, and a kill during the assembly resumes at the last saved group of
   batches), deletes each shard once it is copied, and ends with ``usae_cache_files.finalize``
   on the assembled arrays. The statistics' seeded sample is drawn over the kept images of the
   whole cache there, exactly as in one process, so the standardisation and ``cache.json`` are
   the same. The other ranks wait, then open the finished cache.

Rank 0 holds ``<cache>/.lock`` (``usae_io.exclusive``) from before the first step to after the
last, so the job holds it as a whole whatever started its processes; the other ranks write only
their own shard, and only after rank 0 took the lock. The ranks meet three times (rank 0 took
the lock and checked the folder; every rank extracted its range; rank 0 assembled) in one small
all-reduce (:func:`_agree`) that says which ranks failed and, the first time, whether every rank
asked for the same cache. A rank that failed re-raises its error after it, the others raise a
``RuntimeError`` naming it: no rank waits for ever on one that gave up. A rank killed outright
(SIGKILL, out of memory) leaves the others waiting in the collective until ``torchrun`` stops
the job (it does when one process dies); the same command then resumes every rank.

Disk: the shards together hold the cache's rows once; the cache's arrays are allocated (sparse)
before the shards are written, so the free-space check counts the cache once. During the
assembly the copied rows and the shards not yet deleted coexist: the peak is the cache plus
one shard, ``(1 + 1/N)`` times the cache.

A cache left unfinished by one process is resumed by a sharded build: its ``progress.json``
says which images the arrays hold already, the ranges wholly before that point are not
extracted (the one that straddles it is extracted whole, and only its rest copied). A sharded
build left unfinished and finished by one process goes on from the cache's own
``progress.json`` (the images assembled so far) and ignores the shards, which it deletes at the
end. Resumed with another number of processes, the ranges change: the images not yet assembled
are extracted again into new shards, and the old ones are deleted at the end.

Of the project this module imports ``usae_cache_files`` (the file layer), ``usae_cache_verify``
(reading JSON and arrays safely) and ``usae_io`` (the lock, the request hash); it uses
``torch.distributed`` directly (the cache comes before training in the data flow).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

import usae_cache_files as cache_files
import usae_cache_verify as integrity
import usae_io
from usae_cache_files import LOCK_FILE, METADATA_FILE, PROGRESS_FILE

SHARDS_DIR = "shards"
# Images per saved step of the assembly, rounded down to whole batches: large enough that the
# progress file's fsync costs little beside the copy, small enough to hold in memory.
_COPY_IMAGES = 256


def process_group() -> tuple[int, int] | None:
    """(rank, world size) in an initialised process group of two or more; None otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None


def plan(n_images: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """The image range ``(start, stop)`` of each rank: contiguous, in rank order, the batches of
    one process shared as evenly as whole batches allow (some empty with fewer batches than
    ranks)."""
    batches = -(-n_images // batch_size)
    edges = [min(r * batches // world * batch_size, n_images) for r in range(world + 1)]
    return list(zip(edges, edges[1:]))


def shard_folder(folder: Path, start: int, stop: int) -> Path:
    """Where the rank that extracts images ``start .. stop - 1`` keeps its rows."""
    return folder / SHARDS_DIR / f"images-{start}-{stop}"


def shard_request(request: dict, start: int, stop: int) -> dict:
    """The request of a shard: the cache's, restricted to its images (``open_partial`` sizes
    the arrays from ``n_images``; a shard of another cache or range is refused on resume)."""
    return {**request, "n_images": stop - start, "shard": {"start": start, "stop": stop}}


def remove_shards(folder: Path) -> None:
    """Delete the shards of a sharded build (the files each lists, then the emptied folders)."""
    root = folder / SHARDS_DIR
    if not root.is_dir():
        return
    for shard in root.glob("images-*-*"):
        if shard.is_dir():
            cache_files.remove_cache(shard)
            with contextlib.suppress(OSError):  # holds something else: leave it to its owner
                shard.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def build_sharded(folder: Path, request: dict, batch_size: int, *,
                  reuse: Callable[[], Any], extract: Callable[..., None],
                  finish: Callable[[dict], None], open_cache: Callable[[Path], Any]) -> Any:
    """Build the cache of ``request`` in ``folder`` with every rank of the process group (see
    the module doc); called on every rank with the same arguments.

    Parameters
    ----------
    folder : Path
        The cache folder (exists).
    request : dict
        What names the cache (``usae_cache_files.request_for``).
    batch_size : int
        Images per forward pass; the ranges of the ranks are whole batches of it.
    reuse : callable
        ``reuse()``, on rank 0 under the lock: the complete cache of ``request`` in ``folder``
        or None (deleting the cache and its shards first when asked to rebuild); refuses a cache
        of another request.
    extract : callable
        ``extract(shard, state, arrays, start, stop)``: extract images ``start + images_done``
        .. ``stop - 1`` into the build in ``shard`` (``usae_cache._extract_images``).
    finish : callable
        ``finish(state)``, on rank 0: ``usae_cache_files.finalize`` with the build's state.
    open_cache : callable
        ``usae_cache.open_cache``.

    Returns
    -------
    usae_cache.Cache
        The complete cache, on every rank.

    Raises
    ------
    ValueError
        The ranks asked for different caches or batch sizes.
    RuntimeError
        Another rank failed (its own error says why); run the same job again to resume.
    """
    group = process_group()
    assert group is not None, "build_sharded runs in a process group of two or more"
    rank, world = group
    start, stop = plan(request["n_images"], batch_size, world)[rank]
    digest = int(usae_io.sha256_json([request, batch_size])[:15], 16)
    with contextlib.ExitStack() as held:
        error, cache = None, None
        try:
            if rank == 0:
                held.enter_context(usae_io.exclusive(
                    folder / LOCK_FILE, f"building an activation cache with {world} processes"))
                cache = reuse()
                if cache is None:  # allocated before the shards take space: see the module doc
                    cache_files.open_partial(folder, request)
        except BaseException as caught:  # every rank must still reach the collective
            error = caught
        _agree(error, rank, world, "taking the cache's lock and checking its folder", digest)
        if (folder / METADATA_FILE).exists():  # complete, and for this request: rank 0 checked
            return cache if cache is not None else open_cache(folder)

        error = None
        try:
            assembled = integrity.read_json(folder / PROGRESS_FILE)["images_done"]
            if start < stop and assembled < stop:
                shard = shard_folder(folder, start, stop)
                with cache_files.writing(shard):
                    shard.mkdir(parents=True, exist_ok=True)
                state, arrays = cache_files.open_partial(shard, shard_request(request, start,
                                                                              stop))
                extract(shard, state, arrays, start, stop)
                del arrays
        except BaseException as caught:
            error = caught
        _agree(error, rank, world, "extracting its images")

        error = None
        try:
            if rank == 0:
                finish(_assemble(folder, request, batch_size, world))
                remove_shards(folder)
        except BaseException as caught:
            error = caught
        _agree(error, rank, world, "assembling the shards into the cache")
        return open_cache(folder)


def _assemble(folder: Path, request: dict, batch_size: int, world: int) -> dict:
    """Copy every shard's rows, in image order, into the cache's arrays; return the build's
    state (``progress.json``) for ``finalize``. Resumes where a killed assembly stopped."""
    state, arrays = cache_files.open_partial(folder, request)
    tokens = request["tokens_per_image"]
    step = batch_size * max(1, _COPY_IMAGES // batch_size)
    for start, stop in plan(request["n_images"], batch_size, world):
        done = state["images_done"]
        if done >= stop:  # copied already (or empty)
            continue
        assert start <= done, f"images {done}..{start - 1} are in no shard"
        shard = shard_folder(folder, start, stop)
        shard_state = integrity.read_json(shard / PROGRESS_FILE)
        cache_files.check_request(shard_state, shard_request(request, start, stop), shard,
                                  unfinished=True)
        skipped = shard_state["skipped"]
        assert shard_state["images_done"] == stop - start, f"{shard} is unfinished"
        assert shard_state["rows_done"] == (stop - start - len(skipped)) * tokens, shard
        sources = {name: integrity.load_npy(cache_files.partial(shard / file), mmap_mode="r")
                   for name, file in shard_state["files"].items()}
        row = (done - start - sum(item["index"] < done for item in skipped)) * tokens
        for begin in range(done, stop, step):
            end = min(begin + step, stop)
            here = [item for item in skipped if begin <= item["index"] < end]
            state["skipped"] += here
            count = (end - begin - len(here)) * tokens
            blocks = ({name: np.asarray(source[row:row + count])
                       for name, source in sources.items()} if count else {})
            cache_files.save_batch(folder, state, arrays, blocks, end)
            row += count
        del sources
        cache_files.remove_cache(shard)  # its rows are in the cache now: free the disk
        with contextlib.suppress(OSError):  # holds something else: leave it to its owner
            shard.rmdir()
    del arrays
    return state


def _agree(error: BaseException | None, rank: int, world: int, what: str,
           digest: int = 0) -> None:
    """Meet the other ranks; raise on every rank if one failed or if they differ in ``digest``.

    One all-reduce (max) of a small integer tensor: a failure flag per rank, and the digest
    and its negation (equal maxima on every rank mean equal digests). nccl reduces CUDA
    tensors only, so the tensor goes to this rank's GPU there.
    """
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    flags = torch.zeros(world + 2, dtype=torch.int64)
    flags[rank] = int(error is not None)
    flags[world], flags[world + 1] = digest, -digest
    flags = flags.to(device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    flags = flags.cpu().tolist()
    if error is not None:
        raise error
    failed = [r for r in range(world) if flags[r]]
    if failed:
        raise RuntimeError(
            f"rank {', '.join(map(str, failed))} of {world} failed while {what} (its own error "
            "says why); fix that and run the same job again: the batches every rank finished "
            "are kept and the build resumes.")
    if flags[world] != -flags[world + 1]:
        raise ValueError("the ranks called build_cache with different arguments (their cache "
                         "requests or batch sizes differ); call it with the same arguments on "
                         "every rank.")
