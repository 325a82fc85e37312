"""Kill-and-resume and preemption, with real processes and real signals (`recipes/train.py`, TP=1).

One uninterrupted run A is compared with run B, which is SIGKILLed after its step-2 checkpoint, resumed,
preempted with SIGUSR1 (it must save and exit 42), and resumed again to the end. B's per-step losses and
final weights must equal A's bitwise: everything a step depends on (weights, optimizer, scheduler, data
position, RNG) is restored from the checkpoint. In both checkpoint formats (train.ckpt_format torch and
torch_dist: the SIGKILL also takes dist_checkpointing's forked writer processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from egrsd_megatron.testing.numerics import thread_count
from tests.distributed.test_trainer import tiny_overrides, write_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "recipes", "train.py")


def _start(overrides, log_path):
    # Bitwise comparisons are legitimate only at one layout (TP=1, one process) and one thread count: every
    # trainer process gets the same OMP_NUM_THREADS (this run's, else cpu_count // 2: A and B run at once).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(thread_count(2))}
    # The toy reward lives in the test module: register it in the trainer process through an import.
    code = (
        "import sys, runpy; import tests.distributed.test_trainer; "
        f"sys.argv = [{TRAIN!r}] + sys.argv[1:]; runpy.run_path({TRAIN!r}, run_name='__main__')"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, "tiny_cpu", *overrides],
        cwd=ROOT,
        env=env,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait(proc, pred, what, timeout=300):
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited with {proc.returncode} before {what}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _latest(out):
    p = os.path.join(out, "checkpoints", "latest")
    return open(p).read().strip() if os.path.exists(p) else None


def _steps_logged(out):
    p = os.path.join(out, "metrics.jsonl")
    return [json.loads(line)["step"] for line in open(p)] if os.path.exists(p) else []


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def _weights(out, step):
    """The saved weights of a step folder, Hugging Face-named, whatever its format (formats.open_source)."""
    from egrsd_megatron.checkpoint.formats import open_source
    from egrsd_megatron.checkpoint.layout import emitters

    src = open_source(os.path.join(out, "checkpoints", f"step_{step:08d}", "model"))
    try:
        return {n: t for pm in emitters(src.arch) for n, t in zip(pm.hf_names, src.fetch(pm.hf_names))}
    finally:
        src.close()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_kill_preempt_resume_is_bitwise(tmp_path, fmt):
    data = write_data(str(tmp_path / "train.jsonl"))
    over = lambda out: tiny_overrides(
        data,
        out,
        **{
            "train.steps": 5,
            "train.save_every": 2,  # noqa: E731
            "train.resume": "auto",
            "loss.name": "cl_egrsd",
            "train.ckpt_format": fmt,
        },
    )
    a, b = str(tmp_path / "a"), str(tmp_path / "b")

    pa = _start(over(a), tmp_path / "a.log")
    # Run B alongside A: kill -9 once the step-2 checkpoint is complete.
    pb = _start(over(b), tmp_path / "b1.log")
    _wait(pb, lambda: _latest(b) == "step_00000002", "B's step-2 checkpoint")
    os.killpg(pb.pid, signal.SIGKILL)
    pb.wait()

    # Resume; preempt with SIGUSR1 after it logged step 3: it must finish that step, save, exit 42.
    pb = _start(over(b), tmp_path / "b2.log")
    _wait(pb, lambda: 3 in _steps_logged(b), "B's step 3 after resume")
    # To the whole process group, as Slurm delivers it: reward workers and helpers must survive it.
    os.killpg(pb.pid, signal.SIGUSR1)
    assert pb.wait(timeout=300) == 42, open(tmp_path / "b2.log").read()[-3000:]
    saved = int(_latest(b).split("_")[1])
    assert saved >= 3, f"preemption did not checkpoint the step it finished (latest={_latest(b)})"

    pb = _start(over(b), tmp_path / "b3.log")
    assert pb.wait(timeout=300) == 0, open(tmp_path / "b3.log").read()[-3000:]
    assert pa.wait(timeout=300) == 0, open(tmp_path / "a.log").read()[-3000:]

    assert _steps_logged(b) == _steps_logged(a) == [1, 2, 3, 4, 5]
    # Bitwise (same layout, same thread count, state restored bit for bit): JSON floats round-trip exactly.
    assert _losses(b) == _losses(a)
    wa, wb = _weights(a, 5), _weights(b, 5)
    assert wa.keys() == wb.keys()
    for k in wa:
        if isinstance(wa[k], torch.Tensor):
            assert torch.equal(wa[k], wb[k]), k
    # The killed run really lost work: its step-3 line was rewritten after the resume, not duplicated.
    assert "resumed from" in open(tmp_path / "b2.log").read()
