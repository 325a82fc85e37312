"""Run reward functions with a hard time bound, from any thread or process, on all cores.

math-verify's own timeout uses signal.alarm, which works only in a main thread, and a signal cannot stop
a long C-level computation anyway (sympy evaluating 9^{9^{9^{9}}} with Python big integers runs for
minutes). So each call runs in a worker process of a pebble ProcessPool: a task over its time limit gets
its worker killed and replaced, and scores 0. Workers are started with "spawn" (no fork of a process that
holds gloo/OpenMP threads; override with EGRSD_REWARD_START_METHOD=fork|forkserver); the first call pays
their start (importing math-verify in the initializer, outside any task's budget: ~1 s idle, ~10 s on a
loaded 2-core machine; a replacement after a timeout costs the same). As with any spawn-based
multiprocessing, a script that scores rewards must keep its top-level work under
`if __name__ == "__main__":` (workers re-import the main module).

Signals meant for the trainer: Slurm delivers `--signal=USR1@...` and `scancel --signal` to every process of
the job step, reward workers included, and SIGUSR1's default action kills a process. A worker therefore
ignores SIGUSR1 (and SIGINT, the terminal's Ctrl-C to the whole process group): the trainer alone decides
to save and exit. SIGTERM keeps its default, because the pool stops workers with it. A worker that dies
anyway (killed before its initializer ran, out of memory, SIGTERM) costs one retry of the items it
touched, on a rebuilt pool if pebble declared the pool broken.

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
import signal
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from typing import Callable, Dict, List, Sequence, Tuple

from pebble import ProcessExpired, ProcessPool

from .errors import RewardRejected

log = logging.getLogger(__name__)

RawReward = Callable[[str, str], float]

_lock = threading.Lock()
_pools: Dict[Tuple[int, int, str], object] = {}  # (pid, workers, preloaded module) -> pebble.ProcessPool
_exit_hooked: set = set()  # pids that registered shutdown_pools as an exit finalizer
_counters = {"calls": 0, "timeouts": 0, "errors": 0, "rejected": 0}


def _init_worker(preload: str = "") -> None:
    for sig in (signal.SIGUSR1, signal.SIGINT):  # the trainer's signals, not ours (see module docstring)
        signal.signal(sig, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Pay math-verify's import and grammar build here, not inside the first task's time budget.
    try:
        from math_verify import parse, verify

        verify(parse("$1$", parsing_timeout=None), parse("$1$", parsing_timeout=None), timeout_seconds=None)
    except ImportError:  # rewards that do not need math-verify still work
        pass
    if preload:  # a reward defined elsewhere: import its module before the first timed task
        importlib.import_module(preload)


def _num_workers(n: int) -> int:
    return n if n > 0 else max(1, os.cpu_count() or 1)


def _pool(workers: int, preload: str = ""):
    key = (os.getpid(), workers, preload)  # a forked child must not reuse its parent's pool
    with _lock:
        pool = _pools.get(key)
        if pool is None or not pool.active:
            if pool is not None:  # broken (a worker died while none was busy): free what is left
                pool.stop()
            method = os.environ.get("EGRSD_REWARD_START_METHOD", "spawn")
            _start_resource_tracker_deaf()
            pool = ProcessPool(
                max_workers=workers, initializer=_init_worker, initargs=(preload,), context=mp.get_context(method)
            )
            _pools[key] = pool
            if os.getpid() not in _exit_hooked:
                # A multiprocessing child leaves through os._exit (no atexit): its exit code terminates
                # daemonic children and then joins every child, racing pebble's worker replacement (a hang).
                # A finalizer with an exit priority runs before that, in children and (via
                # multiprocessing's atexit hook) in the main process alike. It is tied to no object: one
                # tied to a pool would stop every pool when a replaced one is garbage-collected.
                mp_util.Finalize(None, shutdown_pools, exitpriority=100)
                _exit_hooked.add(os.getpid())
        return pool


def _start_resource_tracker_deaf() -> None:
    """Start multiprocessing's resource tracker (which pebble's locks need) with SIGUSR1 blocked.

    It ignores SIGINT and SIGTERM itself, but a job-step-wide SIGUSR1 would kill it (Python then relaunches
    it with a warning and prints KeyErrors at exit). A blocked signal mask survives fork and exec, so the
    tracker never sees SIGUSR1; in this thread the block lasts only for the call, and a SIGUSR1 that arrives
    meanwhile stays pending and is delivered when it is lifted: the trainer never misses it.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
    try:
        # The pool enforces timeout_s on each task from the moment a worker starts it.
        return float(fut.result()), "ok"
    except FutureTimeout:
        return 0.0, "timeouts"
    except RewardRejected:
        return 0.0, "rejected"
    except BrokenProcessPool:  # pebble gave the pool up (a worker died while none was busy): retried
        return 0.0, "broken"
    except ProcessExpired as e:  # the worker died in this task (out of memory, a signal): retried once
        log.warning("reward worker died: %s", e)
        return 0.0, "expired"
    except Exception as e:  # noqa: BLE001 - a reward bug scores 0 and is counted, never kills training
        log.warning("reward raised %r: scored 0", e)
        return 0.0, "errors"


def run_bounded(
    fn: RawReward, responses: Sequence[str], answers: Sequence[str], timeout_s: float, num_workers: int = 0
) -> Tuple[List[float], Dict[str, float]]:
    """Score pairs with `fn` (a module-level function, pickled by name), each call bounded by timeout_s."""
    if len(responses) != len(answers):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(answers)} answers")
    if timeout_s <= 0:
        raise ValueError(f"reward.timeout_s must be > 0, got {timeout_s}")
    for i, (r, a) in enumerate(zip(responses, answers)):
        if not isinstance(r, str) or not isinstance(a, str):
            raise ValueError(
                f"score_batch: item {i}: response and answer must be strings, got "
                f"{type(r).__name__} and {type(a).__name__}"
            )
    t0 = time.perf_counter()
    if not responses:  # nothing to score: no pool to start
        return [], {"n": 0, "timeouts": 0, "errors": 0, "rejected": 0, "mean": 0.0, "num_correct": 0, "seconds": 0.0}
    _allow_children()
    # Rewards of this package share one pool; a reward from another module (a test's, a user's) gets a pool
    # whose workers import that module at start, so the import never eats into a task's time budget.
    module = getattr(fn, "__module__", "") or ""
    workers, preload = _num_workers(num_workers), "" if module.startswith(__package__ + ".") else module
    pool = _pool(workers, preload)
    futs = [pool.submit(fn, timeout_s, r, a) for r, a in zip(responses, answers)]
    outs = [_outcome(f) for f in futs]
    # Retry once what the machine, not the answer, may have caused. A timeout can come from a machine too
    # busy to give the worker its time slice (seen at load ~15 on 2 cores), a dead worker from a signal or
    # the OOM killer: a correct answer must not score 0 for that. A truly pathological answer times out
    # twice (2 x timeout_s) and scores 0.
    again = [i for i, (_, kind) in enumerate(outs) if kind in ("timeouts", "expired", "broken")]
    if again:
        pool = _pool(workers, preload)  # a new pool if pebble declared this one broken
        retry = {i: pool.submit(fn, timeout_s, responses[i], answers[i]) for i in again}
        for i, f in retry.items():
            outs[i] = _outcome(f)
    if any(kind == "broken" for _, kind in outs):
        # Twice broken: workers cannot even start (e.g. the main script re-runs unguarded). Scoring
        # everything 0 would silently poison training, so stop here.
        raise RuntimeError(
            "reward worker processes could not start; if this is a script, put its top-level "
            'code under `if __name__ == "__main__":` (workers are spawned and re-import '
            "the main module), or set EGRSD_REWARD_START_METHOD=fork"
        )
    outs = [(s, "errors" if kind == "expired" else kind) for s, kind in outs]
    scores = [s for s, _ in outs]
    stats: Dict[str, float] = {
        "n": len(scores),
        "timeouts": 0,
        "errors": 0,
        "rejected": 0,
        "mean": (sum(scores) / len(scores)) if scores else 0.0,
        "num_correct": sum(1 for s in scores if s >= 1.0),
        "seconds": time.perf_counter() - t0,
    }
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
