"""Asynchronous torch_dist checkpoint saves (checkpoint/async_save.py, train.async_save) on gloo ranks.

- the snapshot is consistent: weights changed in place after the save call returns (and before the writer
  starts: a gate holds it) are not in the checkpoint; what megatron-core stages on CPU aliases the live
  tensors, and with shared-memory weights and the private-snapshot redirect off the change IS written (the
  negative control: the check can fail);
- `latest` never names a folder still being written, on any rank; a failed write raises on every rank and
  leaves `latest` alone;
- a short training run with async saves gives the synchronous run's losses and final weights bitwise, its
  checkpoints resume, and Trainer.run returns only once its last checkpoint is complete (valid manifest).
"""

from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
import pytest
import torch

from egrsd_megatron.checkpoint.manifest import file_entry, verify_manifest
from egrsd_megatron.config import ConfigError, load_config
from egrsd_megatron.testing import run_distributed
from egrsd_megatron.testing.tiny import save_tiny_hf_model
from tests.distributed.test_trainer import tiny_overrides, write_data
from tests.distributed.test_zero import run_trainer

WRITER_DELAY_S = 2.0  # a gated writer sleeps this long: long enough that an unwaited finalize would be seen


def _tiny_model(seed: int = 3, tp: int = 1):
    from egrsd_megatron.config.schema import ModelConfig
    from egrsd_megatron.distributed.runtime import init_distributed
    from egrsd_megatron.models import PRESETS, build_model

    init_distributed(tp, 1, seed=seed)
    return lambda: build_model(PRESETS["qwen3_tiny"], ModelConfig())


def _weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _load_weights(fresh, folder: str) -> dict:
    from megatron.core import dist_checkpointing

    model = fresh()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), folder))
    return _weights(model)


def _gated(request, gate):
    """`request` whose writer process waits for `gate` (a fork-context Event) before writing."""
    write = request.async_fn

    def gated_write(*args, **kwargs):
        if not gate.wait(60):
            raise RuntimeError("gate never opened")
        write(*args, **kwargs)

    return request._replace(async_fn=gated_write)


def snapshot(rank, world, out):
    """The model's weights are saved asynchronously, then changed in place while its writer is held back."""
    import torch.multiprocessing as mp
    from megatron.core import dist_checkpointing

    from egrsd_megatron.checkpoint.async_save import AsyncCheckpointSaver

    fresh = _tiny_model()
    res = {}
    cases = {  # name: (weights in shared memory, the private-snapshot redirect on)
        "private": (False, True),
        "shared_no_redirect": (True, False),  # the negative control
        "shared": (True, True),
    }
    for name, (shared, redirect) in cases.items():
        model = fresh()
        if shared:
            for p in model.parameters():
                p.data.share_memory_()
        before = _weights(model)
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        request = dist_checkpointing.save(model.sharded_state_dict(), folder, async_sharded_save=True)
        if name == "private":
            # What 0.16.1 stages for a CPU tensor is the live tensor itself (no copy).
            staged = [t for _, _, (_, items) in request.preload_fn() for _, t in items]
            live = {p.data_ptr() for p in model.parameters()}
            res["staged_aliases_live"] = sum(t.data_ptr() in live for t in staged) / len(staged)
        gate = mp.get_context("fork").Event()
        saver = AsyncCheckpointSaver(private_snapshot=redirect)
        t0 = time.monotonic()
        saver.schedule(_gated(request, gate), folder)
        res[f"{name}_schedule_s"] = time.monotonic() - t0
        with torch.no_grad():  # "a training step": every weight changes in place
            for p in model.parameters():
                p.add_(1.0)
        gate.set()
        saver.wait()
        saved = _load_weights(fresh, folder)
        # Per parameter: written as it was at the save call, or as changed afterwards.
        res[f"{name}_before"] = sum(torch.equal(saved[n], before[n]) for n in before)
        res[f"{name}_after"] = sum(torch.equal(saved[n], p.detach()) for n, p in model.named_parameters())
    res["n"] = len(before)
    return res


def test_async_snapshot_is_consistent(tmp_path):
    res = run_distributed(snapshot, 1, str(tmp_path), daemon=False, timeout=300)[0]
    # The aliasing exists: most staged tensors are a live parameter's own storage (the others are copies
    # megatron-core made: views of a larger storage are cloned, SwiGLU's fc1 is split into gate and up halves).
    assert res["staged_aliases_live"] > 0.5, res["staged_aliases_live"]
    n = res["n"]
    # Private memory: the fork's copy-on-write image keeps every weight as it was at the save call.
    assert (res["private_before"], res["private_after"]) == (n, 0), res
    # Negative control: shared-memory weights without the redirect: the aliased ones are written as changed
    # afterwards (the check above can fail), the ones megatron-core copied are not.
    assert (
        res["shared_no_redirect_after"] > 0 and res["shared_no_redirect_before"] + res["shared_no_redirect_after"] == n
    )
    # The redirect clones shared-memory tensors at staging time.
    assert (res["shared_before"], res["shared_after"]) == (n, 0), res


def _slow_writer(request, delay: float, marker: str, fail: bool = False):
    """`request` whose writer sleeps `delay` s, then writes (or raises, with `fail`) and records in `marker` the
    time its write ended."""
    write = request.async_fn
    if write is None:  # nothing to write on this rank
        return request

    def slow_write(*args, **kwargs):
        time.sleep(delay)
        if fail:
            raise OSError("injected write failure")
        write(*args, **kwargs)
        with open(marker, "w") as f:
            f.write(repr(time.time()))

    return request._replace(async_fn=slow_write)


def ordering(rank, world, out):
    """Two ranks: rank 1's writer is slow. The finalize must wait for it on rank 0 too; a failed write raises
    AsyncSaveError on every rank and runs no finalize function; abandon waits for this rank's writer only."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from egrsd_megatron.checkpoint.async_save import AsyncCheckpointSaver, AsyncSaveError

    fresh = _tiny_model(tp=world)  # TP: both ranks write a shard (with DP only the main replica writes)
    model = fresh()
    saver = AsyncCheckpointSaver()
    res = {}
    for name, fail in (("ok", False), ("broken", True)):
        folder = os.path.join(out, name)
        if rank == 0:
            os.makedirs(folder)
        dist.barrier()
        marker = os.path.join(out, f"{name}_write_end_{rank}")
        finalized = []
        request = dist_checkpointing.save(model.sharded_state_dict(), folder, async_sharded_save=True)
        request.add_finalize_fn(lambda done=finalized: done.append(time.time()))
        delay = WRITER_DELAY_S if rank == 1 else 0.0
        entries = []  # what the writer hashed: handed to the finalize (the manifest need not read it again)
        slow = _slow_writer(request, delay, marker, fail=fail and rank == 1)
        saver.schedule(slow, folder, finalize=entries.append, root=out)
        while saver.writer_running():  # until this rank's own writer is done; rank 1's is still sleeping
            time.sleep(0.01)
        res[f"{name}_finalized_before_wait"] = bool(finalized)
        try:
            saver.wait()
            res[f"{name}_error"] = None
        except AsyncSaveError as e:
            res[f"{name}_error"] = str(e)
        res[f"{name}_finalized_at"] = finalized[0] if finalized else None
        res[f"{name}_entries_ok"] = bool(entries) and entries[0] == {
            rel: file_entry(os.path.join(out, rel)) for rel in entries[0]
        } == {os.path.relpath(p, out): file_entry(p) for p in glob.glob(os.path.join(folder, f"__{rank}_*.distcp"))}
        dist.barrier()
        res[f"{name}_rank1_write_end"] = (
            float(open(os.path.join(out, f"{name}_write_end_1")).read())
            if os.path.exists(os.path.join(out, f"{name}_write_end_1"))
            else None
        )
    # abandon (an exception's exit path) is local: rank 0 calls it while rank 1 waits in a barrier (a collective
    # inside would hang); it returns once rank 0's (slow) writer has written, and finalizes nothing.
    folder, marker, finalized = os.path.join(out, "abandoned"), os.path.join(out, f"abandoned_{rank}"), []
    if rank == 0:
        os.makedirs(folder)
    dist.barrier()
    request = dist_checkpointing.save(model.sharded_state_dict(), folder, async_sharded_save=True)
    request.add_finalize_fn(lambda done=finalized: done.append(time.time()))
    saver.schedule(_slow_writer(request, WRITER_DELAY_S if rank == 0 else 0.0, marker), folder)
    if rank == 0:
        saver.abandon()
        res["abandoned_written"] = os.path.exists(marker)
    dist.barrier()
    if rank == 1:
        saver.abandon()
    saver.wait()  # nothing left in flight: returns at once
    res["abandoned_finalized"] = bool(finalized)
    res["abandoned_left"] = saver._queue.get_num_unfinalized_calls()
    # ... and no result of the abandoned writer is left for a later save to take as its own.
    res["abandoned_results_left"] = filesystem_async._results_queue.qsize()
    return res


def test_async_finalize_waits_for_every_rank(tmp_path):
    res = run_distributed(ordering, 2, str(tmp_path), daemon=False, timeout=300)
    for r in res:
        assert not r["ok_finalized_before_wait"] and r["ok_error"] is None and r["ok_entries_ok"]
        # Rank 0's finalize ran after rank 1's (slow) write ended, though rank 0's own writer was long done.
        assert r["ok_finalized_at"] >= r["ok_rank1_write_end"]
        # Rank 1's write failed: every rank raises, naming the folder, and nothing was finalized.
        assert r["broken_error"] is not None and "broken" in r["broken_error"] and r["broken_finalized_at"] is None
        assert r["broken_rank1_write_end"] is None
        assert not r["abandoned_finalized"] and r["abandoned_left"] == 0 and r["abandoned_results_left"] == 0
    assert res[0]["abandoned_written"]


def _slow_saver(root: str, delay: float):
    """An AsyncCheckpointSaver whose writers sleep `delay` s first, recording after each save call returns
    (step folder, what `latest` names, whether the step folder exists yet)."""
    from egrsd_megatron.checkpoint.async_save import AsyncCheckpointSaver

    class SlowSaver(AsyncCheckpointSaver):
        def __init__(self):
            super().__init__()
            self.seen = []

        def schedule(self, request, folder, **kwargs):
            super().schedule(_slow_writer(request, delay, os.devnull), folder, **kwargs)
            latest = os.path.join(root, "latest")
            tracked = open(latest).read().strip() if os.path.exists(latest) else None
            self.seen.append((os.path.basename(folder), tracked, os.path.isdir(folder)))

    return SlowSaver()


def _run(overrides, saver_delay=None, stop_after=None):
    """Train; with `stop_after`, preempted (SIGUSR1) after that many steps: it saves and returns 42."""
    from egrsd_megatron.trainer.loop import Trainer

    trainer = Trainer(load_config(None, overrides))
    if saver_delay is not None:
        trainer.saver = _slow_saver(trainer.ckpt_root, saver_delay)
    return run_trainer(trainer, stop_after)


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: r[k] for k in ("step", "loss", "grad_norm", "lr")} for r in map(json.loads, f)]


def train_runs(rank, world, data, out):
    """sync: 4 steps, synchronous torch_dist saves. async: the same run with async saves whose writers first sleep
    WRITER_DELAY_S (so step 3's update usually lands while step 2's checkpoint is being written; the snapshot
    test above forces that order), preempted after step 3 (the SIGUSR1 exit path). resumed: from async's step-2
    checkpoint to step 4."""
    common = {
        "loss.name": "opsd",  # a loss that trains from step 1 (no reward needed)
        "train.steps": 4,
        "train.save_every": 1,
        "train.keep_last": 3,
        "train.ckpt_format": "torch_dist",
        "parallel.tp": world,
    }
    sync, asy = os.path.join(out, "sync"), os.path.join(out, "async")
    res = {"sync": _weights(_run(tiny_overrides(data, sync, **common)).model)}
    trainer = _run(
        tiny_overrides(data, asy, **common, **{"train.async_save": "true"}), saver_delay=WRITER_DELAY_S, stop_after=3
    )
    # Right as run() returns (42, preempted): the last checkpoint is finalized, complete and named by `latest`.
    root = trainer.ckpt_root
    res["latest_at_return"] = open(os.path.join(root, "latest")).read().strip()
    res["problems_at_return"] = verify_manifest(os.path.join(root, res["latest_at_return"]))
    res["seen"] = trainer.saver.seen
    res["rows_async"] = _rows(asy)
    step2 = os.path.join(root, "step_00000002")
    extra = {"train.save_every": 0, "train.async_save": "true", "train.resume": step2}
    res["resumed"] = _weights(_run(tiny_overrides(data, asy, **{**common, **extra})).model)
    res["rows_sync"], res["rows_resumed"] = _rows(sync), _rows(asy)
    return res


@pytest.mark.slow
def test_async_training_run_matches_sync_and_resumes(tmp_path):
    data = write_data(str(tmp_path / "train.jsonl"))
    save_tiny_hf_model(str(tmp_path / "tiny_hf"))  # once, before the ranks start
    results = run_distributed(train_runs, 2, data, str(tmp_path), daemon=False, timeout=900)
    for r in results:
        sync, asy, resumed = r["rows_sync"], r["rows_async"], r["rows_resumed"]
        # (metrics.jsonl of a resumed run keeps the rows up to the resumed step, then the new ones)
        assert [x["step"] for x in sync] == [x["step"] for x in resumed] == [1, 2, 3, 4]
        assert [x["step"] for x in asy] == [1, 2, 3]
        assert all(x["grad_norm"] > 0 for x in sync)  # a run that trains nothing would make this vacuous
        # Bitwise: async saves change nothing the run computes ...
        assert asy == sync[:3]
        # ... and the step-2 checkpoint, written while step 3 ran, holds step 2's state: the resumed steps
        # and final weights are the synchronous run's.
        assert resumed[2:] == sync[2:]
        assert all(np.array_equal(r["resumed"][n], r["sync"][n]) for n in r["sync"])
        # `latest` never named a folder being written: after each save call it named the previous step,
        # and the new step folder did not exist yet.
        assert [tuple(s) for s in r["seen"]] == [
            ("step_00000001", None, False),
            ("step_00000002", "step_00000001", False),
            ("step_00000003", "step_00000002", False),
        ]
        # Trainer.run returned only once the last checkpoint was complete.
        assert r["latest_at_return"] == "step_00000003" and r["problems_at_return"] == []


def test_async_save_needs_torch_dist():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.async_save=true", "train.ckpt_format=torch"])
    assert "train.async_save" in str(e.value) and "train.ckpt_format=torch_dist" in str(e.value)
    assert load_config(None, ["train.async_save=true", "train.ckpt_format=torch_dist"]).train.async_save
