"""Run reward functions with a hard time bound, from any thread or process, on all cores.

math-verify's own timeout uses signal.alarm, which works only in a main thread, and a signal cannot stop
a long C-level computation anyway (sympy evaluating 9^{9^{9^{9}}} with Python big integers runs for minutes). So each call
runs in a worker process of a pebble ProcessPool: a task over its time limit gets its worker killed and
replaced, and scores 0. Workers are started with "spawn" (no fork of a process that holds gloo/OpenMP
threads; override with EGRSD_REWARD_START_METHOD=fork|forkserver); the first call pays their start
(importing math-verify in the initializer, outside any task's budget: ~1 s idle, ~10 s on a loaded
2-core machine; a replacement after a timeout costs the same). As with any spawn-based multiprocessing, a script that scores rewards
must keep its top-level work under `if __name__ == "__main__":` (workers re-import the main module).

A daemonic process (multiprocessing's daemon=True) may not start children. A thread with a join timeout
is no way out: sympy's big-integer arithmetic holds the GIL, so the caller would hang with it. So such a
process lifts its own daemon flag before starting the pool (that flag only guards child creation; its
parent still terminates it as before), and the workers exit when their pool's pipe closes.
"""
from __future__ import annotations

import atexit
import importlib
import logging
import multiprocessing as mp
import multiprocessing.util as mp_util
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Dict, List, Sequence, Tuple

from .errors import RewardRejected

log = logging.getLogger(__name__)

RawReward = Callable[[str, str], float]

_lock = threading.Lock()
_pools: Dict[Tuple[int, int, str], object] = {}   # (pid, workers, preloaded module) -> pebble.ProcessPool
_counters = {"calls": 0, "timeouts": 0, "errors": 0, "rejected": 0}


def _init_worker(preload: str = "") -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Pay math-verify's import and grammar build here, not inside the first task's time budget.
    try:
        from math_verify import parse, verify
        verify(parse("$1$", parsing_timeout=None), parse("$1$", parsing_timeout=None), timeout_seconds=None)
    except ImportError:   # rewards that do not need math-verify still work
        pass
    if preload:           # a reward defined elsewhere: import its module before the first timed task
        importlib.import_module(preload)


def _num_workers(n: int) -> int:
    return n if n > 0 else max(1, os.cpu_count() or 1)


def _pool(workers: int, preload: str = ""):
    from pebble import ProcessPool
    key = (os.getpid(), workers, preload)   # a forked child must not reuse its parent's pool
    with _lock:
        pool = _pools.get(key)
        if pool is None or not pool.active:
            method = os.environ.get("EGRSD_REWARD_START_METHOD", "spawn")
            pool = ProcessPool(max_workers=workers, initializer=_init_worker, initargs=(preload,),
                               context=mp.get_context(method))
            _pools[key] = pool
            # A multiprocessing child leaves through os._exit (no atexit): its exit code terminates daemonic
            # children and then joins every child, racing pebble's worker replacement (a hang). A finalizer
            # with an exit priority runs before that, in children and (via multiprocessing's atexit hook)
            # in the main process alike.
            mp_util.Finalize(pool, shutdown_pools, exitpriority=100)
        return pool


@atexit.register
def shutdown_pools() -> None:
    """Stop this process's reward workers (also called at exit)."""
    with _lock:
        pools = list(_pools.items())
        _pools.clear()
    for (pid, _, _), pool in pools:
        if pid == os.getpid():
            pool.stop()
            pool.join(timeout=5)


def _allow_children() -> None:
    proc = mp.current_process()
    if proc.daemon:
        log.info("reward pool in daemonic process %s: lifting its daemon flag so it can start workers", proc.name)
        proc._config["daemon"] = False  # type: ignore[attr-defined]


def _outcome(fut) -> Tuple[float, str]:
    from concurrent.futures.process import BrokenProcessPool

    from pebble import ProcessExpired
    try:
        # The pool enforces timeout_s on each task from the moment a worker starts it.
        return float(fut.result()), "ok"
    except FutureTimeout:
        return 0.0, "timeouts"
    except RewardRejected:
        return 0.0, "rejected"
    except BrokenProcessPool as e:
        # Workers cannot even start (e.g. the main script re-runs unguarded): scoring everything 0 would
        # silently poison training, so stop here.
        raise RuntimeError("reward worker processes could not start; if this is a script, put its top-level "
                           "code under `if __name__ == \"__main__\":` (workers are spawned and re-import "
                           "the main module), or set EGRSD_REWARD_START_METHOD=fork") from e
    except ProcessExpired as e:   # the worker died (e.g. out of memory): 0, counted, worker replaced
        log.warning("reward worker died: %s", e)
        return 0.0, "errors"
    except Exception as e:  # noqa: BLE001 - a reward bug scores 0 and is counted, never kills training
        log.warning("reward raised %r: scored 0", e)
        return 0.0, "errors"


def run_bounded(fn: RawReward, responses: Sequence[str], answers: Sequence[str], timeout_s: float,
                num_workers: int = 0) -> Tuple[List[float], Dict[str, float]]:
    """Score pairs with `fn` (a module-level function, pickled by name), each call bounded by timeout_s."""
    if len(responses) != len(answers):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(answers)} answers")
    if timeout_s <= 0:
        raise ValueError(f"reward.timeout_s must be > 0, got {timeout_s}")
    for i, (r, a) in enumerate(zip(responses, answers)):
        if not isinstance(r, str) or not isinstance(a, str):
            raise ValueError(f"score_batch: item {i}: response and answer must be strings, got "
                             f"{type(r).__name__} and {type(a).__name__}")
    t0 = time.perf_counter()
    if not responses:     # nothing to score: no pool to start
        return [], {"n": 0, "timeouts": 0, "errors": 0, "rejected": 0, "mean": 0.0, "num_correct": 0,
                    "seconds": 0.0}
    _allow_children()
    # Rewards of this package share one pool; a reward from another module (a test's, a user's) gets a pool
    # whose workers import that module at start, so the import never eats into a task's time budget.
    module = getattr(fn, "__module__", "") or ""
    pool = _pool(_num_workers(num_workers), "" if module.startswith(__package__ + ".") else module)
    futs = [pool.submit(fn, timeout_s, r, a) for r, a in zip(responses, answers)]
    outs = [_outcome(f) for f in futs]
    # A timeout can also come from a machine too busy to give the worker its time slice (seen at load ~15 on
    # 2 cores): retry timed-out items once, so a correct answer is not scored 0 because of load; a truly
    # pathological one times out twice (2 x timeout_s) and scores 0.
    again = [i for i, (_, kind) in enumerate(outs) if kind == "timeouts"]
    if again:
        retry = {i: pool.submit(fn, timeout_s, responses[i], answers[i]) for i in again}
        for i, f in retry.items():
            outs[i] = _outcome(f)
    scores = [s for s, _ in outs]
    stats: Dict[str, float] = {"n": len(scores), "timeouts": 0, "errors": 0, "rejected": 0,
                               "mean": (sum(scores) / len(scores)) if scores else 0.0,
                               "num_correct": sum(1 for s in scores if s >= 1.0),
                               "seconds": time.perf_counter() - t0}
    for _, kind in outs:
        if kind != "ok":
            stats[kind] += 1
    with _lock:
        _counters["calls"] += len(scores)
        for k in ("timeouts", "errors", "rejected"):
            _counters[k] += int(stats[k])
    return scores, stats


def reward_counters() -> Dict[str, int]:
    """Process-wide totals since start: calls, timeouts, errors, rejected (for logging)."""
    with _lock:
        return dict(_counters)
