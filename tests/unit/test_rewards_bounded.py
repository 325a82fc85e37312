"""Time bounds: pathological answers, a reward that hangs, calls from a thread and from child processes
(normal and daemonic), crashing rewards; everything scores 0 within the bound and is counted."""

import multiprocessing as mp
import threading
import time

import pytest

from egrsd_megatron.rewards import get_reward, math_reward, register_reward, reward_counters, score_batch

# Overhead on a loaded 2-core machine: queueing, killing a worker and spawning its replacement (which imports
# math-verify before it takes the next task). Unbounded, 9^{9^{9^{9}}} runs for minutes.
SLACK_S = 10.0


def sleepy_reward(response: str, answer: str) -> float:
    time.sleep(60)
    return 1.0


def crashing_reward(response: str, answer: str) -> float:
    raise KeyError("a bug in a reward")


def _dying_reward(response: str, answer: str) -> float:
    import os

    os._exit(3)


register_reward("test_sleepy", sleepy_reward)
register_reward("test_crash", crashing_reward)
register_reward("test_dying", _dying_reward)


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    # pay the worker start-ups once, outside the timed parts: the package's pool and this module's pool
    score_batch(["\\boxed{1}"] * 2, ["1"] * 2, timeout_s=60)
    score_batch(["a"], ["1"], name="test_crash", timeout_s=60)


def test_pathological_answers_bounded_and_counted():
    huge = "\\boxed{" + "9" * 100_000 + "}"
    responses = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{9^9^9^9^9}", "x" * 100_000 + huge, huge, "\\boxed{2}"]
    answers = ["3", "1", "1", "9" * 100_000, "2"]
    t0 = time.perf_counter()
    scores, stats = score_batch(responses, answers, name="math", timeout_s=1.5)
    elapsed = time.perf_counter() - t0
    assert scores == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert stats["timeouts"] >= 1 and stats["rejected"] == 2  # the 100k-char answers are refused early
    assert elapsed < 1.5 * 2 + SLACK_S  # at most two 1.5 s rounds on >= 1 worker


def test_hanging_reward_from_a_thread_then_pool_recovers():
    before = reward_counters()["timeouts"]
    out = {}

    def run():
        t0 = time.perf_counter()
        out["score"] = get_reward("test_sleepy")("r", "a", timeout_s=1.0)
        out["t"] = time.perf_counter() - t0

    th = threading.Thread(target=run)
    th.start()
    th.join(30)
    assert not th.is_alive() and out["score"] == 0.0 and out["t"] < 1.0 + SLACK_S
    assert reward_counters()["timeouts"] == before + 1
    assert math_reward("\\boxed{4}", "4", timeout_s=60) == 1.0  # the killed worker was replaced


def test_crashes_and_dead_workers_are_counted():
    scores, stats = score_batch(["a", "b"], ["1", "2"], name="test_crash")
    assert scores == [0.0, 0.0] and stats["errors"] == 2
    scores, stats = score_batch(["a"], ["1"], name="test_dying", timeout_s=5)
    assert scores == [0.0] and stats["errors"] == 1
    assert math_reward("\\boxed{4}", "4", timeout_s=60) == 1.0


def _child(q):
    assert math_reward("\\boxed{1}", "1", timeout_s=60) == 1.0  # start this process's own pool first
    t0 = time.perf_counter()
    s1 = math_reward("\\boxed{9^{9^{9^{9}}}}", "3", timeout_s=1.0)
    t = time.perf_counter() - t0
    s2 = math_reward("\\boxed{0.5}", "1/2", timeout_s=60.0)
    q.put((s1, s2, t, reward_counters()["timeouts"]))


@pytest.mark.slow  # each child starts its own reward pool: ~10-30 s on a loaded 2-core machine
@pytest.mark.parametrize("daemon", [False, True])
def test_bounded_inside_child_processes(daemon):
    """A spawned child (the trainer's ranks are processes) and a daemonic one (which multiprocessing forbids
    to start children unless the flag is lifted) are both bounded."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,), daemon=daemon)
    p.start()
    s1, s2, t, timeouts = q.get(timeout=180)
    p.join(30)
    assert (s1, s2) == (0.0, 1.0) and timeouts == 1
    assert t < 1.0 + SLACK_S


def test_register_rejects_unpicklable():
    with pytest.raises(ValueError, match="module-level"):
        register_reward("bad", lambda r, a: 1.0)


def test_batch_uses_all_cores_and_preloads_foreign_modules():
    import os

    from egrsd_megatron.rewards import bounded

    score_batch(["\\boxed{1}"], ["1"], num_workers=0, timeout_s=60)
    score_batch(["a"], ["1"], name="test_crash", num_workers=0, timeout_s=60)
    keys = [k for k in bounded._pools if k[0] == os.getpid()]
    assert (os.getpid(), os.cpu_count(), "") in keys  # num_workers=0: one worker per core
    assert (os.getpid(), os.cpu_count(), __name__) in keys  # this module imported at worker start


def _worker_pids():
    return [p.pid for p in mp.active_children() if p.pid is not None]


def test_workers_ignore_the_trainers_signals():
    """Slurm sends `--signal=USR1@...` to every process of the step: a reward worker must survive it (and
    Ctrl-C's SIGINT to the process group), leaving the trainer to save and exit."""
    import os
    import signal

    score_batch(["\\boxed{1}"] * 2, ["1"] * 2, timeout_s=60)
    # Every multiprocessing child of this process (the reward workers, and possibly a child an earlier test
    # left that ends on its own): none may die OF the signals, which shows as exitcode -SIGUSR1 / -SIGINT.
    procs = [p for p in mp.active_children() if p.pid is not None]
    assert procs, "no reward workers to signal"
    for p in procs:
        os.kill(p.pid, signal.SIGUSR1)
        os.kill(p.pid, signal.SIGINT)
    time.sleep(1.0)
    killed = [p.exitcode for p in procs if not p.is_alive() and p.exitcode in (-signal.SIGUSR1, -signal.SIGINT)]
    assert not killed, f"a reward worker died of SIGUSR1/SIGINT: exit codes {killed}"
    scores, stats = score_batch(["\\boxed{1}", "\\boxed{3}"], ["1", "2"], timeout_s=60)
    assert scores == [1.0, 0.0] and stats["errors"] == 0


def test_killed_workers_cost_a_retry_not_a_score():
    """Workers killed while idle (pebble then declares the pool broken) or mid-task: the batch is retried on
    replacement workers and scores as if nothing happened."""
    import os
    import signal

    score_batch(["\\boxed{1}"] * 2, ["1"] * 2, timeout_s=60)
    for pid in _worker_pids():
        os.kill(pid, signal.SIGKILL)
    scores, stats = score_batch(["\\boxed{1}", "\\boxed{3}", "\\boxed{2}"], ["1", "2", "2"], timeout_s=60)
    assert scores == [1.0, 0.0, 1.0] and stats["errors"] == 0
