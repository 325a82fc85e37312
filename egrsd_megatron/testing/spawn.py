"""Run a function in N spawned gloo processes and collect their results.

Why by hand: torch.multiprocessing.spawn raises only the first child's exception (without its
traceback as text through pytest) and waits forever on a hung child; tests need both a child's own
traceback and a hard timeout.

The function runs as `fn(rank, world_size, *args)` after `torch.distributed` is initialised with gloo
on a free localhost port. Its return value must be picklable; tensors are converted to numpy before
crossing the queue (torch tensors sent through a queue by an exiting child can arrive broken).
Each rank's thread count and deterministic mode follow OMP_NUM_THREADS and EGRSD_DETERMINISTIC
(`numerics.apply_numerics`; unset: cpu_count // world_size threads).

Children are daemonic by default (they die with the parent). `daemon=False` is for code that starts
processes of its own, which a daemonic process may not do: megatron.core.dist_checkpointing's torch_dist
writer (`FileSystemWriterAsync.write_preloaded_data_multiproc`) forks one worker per write bucket even
for a synchronous save. Non-daemonic children are still killed in `finally` when the parent gives up.
"""

from __future__ import annotations

import os
import queue as queue_mod
import sys
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..utils.net import free_port
from .numerics import apply_numerics


class DistributedChildError(RuntimeError):
    """A child rank raised; the message carries that child's own traceback."""


def _to_portable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _to_portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_portable(v) for v in obj)
    return obj


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, env: dict, q) -> None:
    try:
        os.environ.update(env)
        os.environ.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
            }
        )
        apply_numerics(world_size)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            _teardown()
        q.put((rank, "ok", _to_portable(result)))
    except BaseException:  # noqa: BLE001 - the parent must see every failure, with its traceback
        q.put((rank, "error", traceback.format_exc()))


def _teardown() -> None:
    # Only if the child used Megatron: importing megatron.core just to tear down costs seconds per rank.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    try:
        if parallel_state is not None and parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001 - as before: teardown problems must not mask the test's own result
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict | None = None,
    daemon: bool = True,
) -> List[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return results ordered by rank.

    Raises DistributedChildError with the failing child's traceback, or TimeoutError naming the ranks
    that did not finish within `timeout` seconds (the children are then killed).
    `fn` must be importable at module level (spawn pickles it by reference). `daemon=False`: the
    children may start processes of their own (see the module docstring).
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, fn, args, env or {}, q), daemon=daemon)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict = {}
    errors: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results) - set(errors))
                raise TimeoutError(
                    f"run_distributed: ranks {missing} of {world_size} did not finish within "
                    f"{timeout:.0f} s (hung collective?); killed them"
                )
            try:
                rank, status, payload = q.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and p.exitcode not in (0, None) and r not in results and r not in errors
                ]
                if dead:
                    # A child died without reporting (segfault, os._exit, OOM kill).
                    r = dead[0]
                    raise DistributedChildError(
                        f"rank {r} of {world_size} died with exit code {procs[r].exitcode}"
                    ) from None
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors[rank] = payload
                # One failing rank usually hangs the others in a collective: report it at once.
                raise DistributedChildError(f"rank {rank} of {world_size} failed:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world_size)]
