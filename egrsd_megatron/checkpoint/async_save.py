"""Asynchronous checkpoint saves (`train.async_save`, torch_dist only) on Megatron-Core's AsyncCallsQueue.

A save then happens in three parts:
1. in the save call, which is all the training loop waits for: the previous asynchronous save is finished
   first (`wait`); every rank writes its small files (RNG, trainer state, dist_checkpointing's common.pt),
   plans its share of the sharded write and stages it: `dist_checkpointing.save(..., async_sharded_save=True)`
   returns an AsyncRequest, and `schedule` hands it to Megatron-Core's TemporalAsyncCaller, which runs the
   request's preload_fn (tensors to host memory) and forks one writer process;
2. in the background: the writer (FileSystemWriterAsync.write_preloaded_data_multiproc) forks one worker per
   write bucket, which write and fsync this rank's .distcp files; then the writer hashes them (their manifest
   entries go back through a pipe, so the finalize does not read them again);
3. at the next save and at the end of the run (`wait`, collective): every rank reports whether its writer is
   done (one all-reduce), and only once it is done on EVERY rank do the request's finalize functions run, in
   order: dist_checkpointing's (write results gathered, `.metadata`, `metadata.json`), then the caller's (the
   manifest, step_N.tmp -> step_N, `latest`, pruning). So `latest` never names a folder still being written.
   A writer that failed on any rank makes every rank raise (torch.distributed.checkpoint's CheckpointException,
   re-raised as AsyncSaveError naming the folder); step_N.tmp is then left behind (the next save removes it)
   and `latest` still names the previous complete checkpoint.

Snapshot consistency: a training step that runs while the writer works must not change what is written. What
megatron-core 0.16.1 does (dist_checkpointing/strategies/filesystem_async.py, async_utils.py):
- CUDA tensors: preload_fn (`FileSystemWriterAsync.preload_tensors`) copies each into a new host tensor
  before the writer forks; later steps cannot reach it.
- CPU tensors (everything on a CPU machine; Adam's `step` counters on a GPU too): `tensor.to("cpu")` returns
  the tensor itself, and `prepare_write_data` clones only views of a larger storage, so the staged tensor IS
  the live parameter or optimizer state: it aliases. What keeps the write consistent is the fork: the writer
  works on a copy-on-write image of the trainer's memory as of the fork, so a later in-place update writes to
  the trainer's own (then copied) page, never to the writer's. That holds for private memory only: a storage
  in shared memory (`share_memory_()`, a tensor received through a torch.multiprocessing queue, a MAP_SHARED
  file mapping) is the same physical memory in both processes. `_private_snapshot` clones exactly those at
  staging time (the one redirect; it touches nothing else). For the same reason Megatron-Core's
  PersistentAsyncCaller (a spawned worker fed through a torch.multiprocessing queue, which moves every CPU
  tensor it is sent into shared memory) would write live weights on CPU: it is not used (persistent=False).
  tests/distributed/test_async_save.py checks both: weights changed in place before the writer starts are not
  in the checkpoint, and with shared-memory weights and the redirect off, they are.
Costs the loop sees: planning, staging (D2H on GPU), the fork, and at the next save or exit the finalize
(`.metadata`, hashing the small files, renames). Memory on CPU: the copy-on-write pages the steps touch while
the writer runs (at most the size of the state).
"""

from __future__ import annotations

import logging
import os
import queue
from typing import Callable, Dict, List, Optional, Tuple

import torch.multiprocessing as mp
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from torch.distributed.checkpoint import CheckpointException

from .manifest import file_entry

log = logging.getLogger(__name__)

__all__ = ["AsyncCheckpointSaver", "AsyncSaveError"]


class AsyncSaveError(RuntimeError):
    """An asynchronous checkpoint write failed on some rank; the previous checkpoints are unchanged."""


def _private_snapshot(preload_fn: Callable[[], List]) -> Callable[[], List]:
    """preload_fn, with every staged CPU tensor in shared memory replaced by a private copy (module docstring).

    The staged result is megatron-core's list of WriteBucket = (file path, storage key, (bytes items, tensor
    items)), each tensor item a (WriteItem, tensor) pair.
    """

    def staged() -> List:
        out = []
        for path, key, (byte_items, tensor_items) in preload_fn():
            tensor_items = [
                (item, t.clone() if t.device.type == "cpu" and t.is_shared() else t) for item, t in tensor_items
            ]
            out.append((path, key, (byte_items, tensor_items)))
        return out

    return staged


def _hashing_writer(request: AsyncRequest, root: str) -> Tuple[AsyncRequest, Callable[[], Dict], object]:
    """(`request` whose writer, after writing and fsyncing this rank's files, sends their manifest entries
    through a pipe; a function the finalize calls to receive them; the pipe's sending end, for the parent to
    close). The writer's arguments are megatron-core's (rank, staged WriteBuckets, results queue).

    Why: hashing the files is most of the finalize (a 0.6B model with AdamW is ~7 GB of SHA-256), which the
    loop would wait for at the next save; the writer hashes them in the background, from the page cache.
    """
    recv, send = mp.get_context("fork").Pipe(duplex=False)
    write = request.async_fn

    def write_then_hash(*args, **kwargs):
        write(*args, **kwargs)
        send.send({os.path.relpath(path, root): file_entry(path) for path, _, _ in args[1]})

    def entries() -> Dict:
        try:
            return recv.recv() if recv.poll() else {}  # nothing sent: the writer failed or was killed
        finally:
            recv.close()

    return request._replace(async_fn=write_then_hash), entries, send


class AsyncCheckpointSaver:
    """At most one checkpoint write in flight, finalized only once it is complete on every rank.

    `schedule`, `wait` and `close` are collective (every rank calls them, in the same order); `abandon` is
    local. Nothing is started before the first `schedule`, and `wait` with nothing in flight returns at once
    without communicating.
    """

    def __init__(self, private_snapshot: bool = True) -> None:
        # persistent=False: a forked writer per save (the copy-on-write snapshot; module docstring).
        self._queue = AsyncCallsQueue(persistent=False)
        self._private_snapshot = private_snapshot  # False only in the test's negative control
        self.pending: Optional[str] = None  # the folder the save in flight becomes once finalized

    def schedule(
        self,
        request: AsyncRequest,
        folder: str,
        finalize: Optional[Callable[[Dict[str, Dict[str, object]]], None]] = None,
        root: Optional[str] = None,
    ) -> None:
        """Collective: finish the previous save (`wait`), then stage `request` and start its writer; returns
        as soon as the writer runs. In `wait`, once the write is complete on every rank, `request`'s finalize
        functions run, then `finalize(entries)`: `entries` are the manifest entries (manifest.file_entry) of
        the files this rank's writer wrote, keyed by their path relative to `root`, which the writer computed
        right after writing them (so the finalize need not read them again; {} if it could not)."""
        self.wait()
        if request.preload_fn is not None and self._private_snapshot:
            request = request._replace(preload_fn=_private_snapshot(request.preload_fn))
        entries, send = (lambda: {}), None
        if root is not None and request.async_fn is not None:
            request, entries, send = _hashing_writer(request, root)
        if finalize is not None:
            request.add_finalize_fn(lambda: finalize(entries()))
        self._queue.schedule_async_request(request)
        if send is not None:
            send.close()  # the forked writer holds its own copy
        self.pending = folder

    def wait(self) -> None:
        """Collective: block until the save in flight is written on every rank, then run its finalize functions.

        Raises AsyncSaveError when a writer failed on any rank (on every rank alike).
        """
        if self._queue.get_num_unfinalized_calls() == 0:
            return
        folder, self.pending = self.pending, None
        try:
            self._queue.maybe_finalize_async_calls(blocking=True)
        except CheckpointException as e:
            raise AsyncSaveError(
                f"the asynchronous save of {folder} failed ({e}); it was not finalized: {folder}.tmp is left "
                f"(the next save removes it) and `latest` still names the previous complete checkpoint"
            ) from e

    def writer_running(self) -> bool:
        """Local: whether this rank's writer process (of the save in flight) is still running."""
        return any(
            c.async_caller.process is not None and c.async_caller.process.is_alive() for c in self._queue.async_calls
        )

    def abandon(self) -> None:
        """Local (no collective): wait for this rank's writer process to exit, finalize nothing.

        For an exception, when the other ranks may be anywhere: a collective here could hang. The save in
        flight stays an unfinished step_N.tmp folder (never named by `latest`; the next save removes it).
        The abandoned writer's result is drained from megatron-core's process-wide results queue (a later save
        of this process would otherwise read it as its own).
        """
        while self._queue.async_calls:
            call = self._queue.async_calls.popleft()
            call.async_caller.close()  # TemporalAsyncCaller.close: joins the writer process
            log.warning("checkpoint %s: the asynchronous save was not finalized (the run is failing)", self.pending)
        results = filesystem_async._results_queue  # None until a torch_dist save made it
        while results is not None:
            try:
                results.get_nowait()
            except queue.Empty:
                break
        self.pending = None

    def close(self) -> None:
        """Collective: `wait`, then release the queue."""
        self.wait()
        self._queue.close()
