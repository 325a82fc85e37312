"""The Slurm scripts on a REAL Slurm (slurmctld + slurmd + munged on localhost, started by the test).

One tiny CPU training job goes through slurm/egrsd_tiny_cpu.sh -> slurm/launcher.sh -> srun ->
recipes/train.py, the same launcher code path as the GPU scripts. The test checks that it trains and
checkpoints, then preempts it (`scancel --signal=USR1`, as Slurm's `--signal=USR1@120` does before the time
limit): the trainer finishes its step, saves and exits 42, the launcher requeues the job, and the requeued
job resumes from that checkpoint and finishes. Needs root and apt-get (slurm-wlm, munge), else skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from .slurm_local import LocalSlurm, SlurmUnavailable, ensure_installed, free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ["egrsd_qwen3_8b.sh", "egrsd_qwen3_4b.sh", "convert_hf_to_megatron.sh", "eval.sh", "egrsd_tiny_cpu.sh"]
# Enough steps that the signal, sent as soon as the first checkpoint exists, lands mid-run even on a fast
# machine (a tiny step takes ~0.5 s on 2 idle cores, several seconds under load).
STEPS = 16
pytestmark = pytest.mark.slurm
# Each job gets MASTER_PORT=free_port(): the launcher's default (20000 + job id) would collide between two
# test sessions on one machine, whose private Slurms both number their jobs from 1.


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        ensure_installed()
        s = LocalSlurm(str(tmp_path_factory.mktemp("slurm")), cpus=2).start()
    except SlurmUnavailable as e:
        pytest.skip(f"no local Slurm: {e}")
    try:
        yield s
    finally:
        s.cancel_all()
        s.stop()


def _read(path: str) -> str:
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def _latest(run_dir: str) -> str:
    return _read(os.path.join(run_dir, "checkpoints", "latest")).strip()


def _steps(run_dir: str) -> list:
    return [json.loads(line)["step"] for line in _read(os.path.join(run_dir, "metrics.jsonl")).splitlines() if line]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash_and_accepted_by_sbatch(slurm, script, tmp_path):
    path = os.path.join(REPO, "slurm", script)
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    for header in ("--requeue", "--open-mode=append", "--nodes=", "--ntasks-per-node=", "--time="):
        assert f"#SBATCH {header}" in text, f"{script}: missing #SBATCH {header}"
    assert 'source "$EGRSD_REPO/slurm/launcher.sh"' in text and "egrsd_launch " in text
    # sbatch parses the headers and checks the job could run (the local node has no GPUs and one node,
    # so only the size is overridden on the command line).
    r = slurm.run(
        [
            "sbatch",
            "--test-only",
            "--nodes=1",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--mem=100M",
            "--gpus-per-node=0",
            f"--output={tmp_path}/x.out",
            path,
        ],
        check=False,
        cwd=REPO,
    )
    assert r.returncode == 0, f"sbatch --test-only {script}: {r.stderr}"


@pytest.mark.slow
def test_tiny_training_job_trains_checkpoints_and_survives_preemption(slurm, gpu_script_job, tmp_path):
    # (gpu_script_job: the 8B script's job, started now so it runs beside this one; checked below.)
    from egrsd_megatron.cli import main

    data = str(tmp_path / "train.jsonl")
    assert main(["data", "synth", "--n", "64", "--out", data]) == 0
    run_dir = str(tmp_path / "run")
    env = {
        "EGRSD_REPO": REPO,
        "EGRSD_RUN_DIR": run_dir,
        "EGRSD_RUNTIME": "venv",
        "MASTER_PORT": free_port(),
        "EGRSD_VENV": os.path.dirname(os.path.dirname(sys.executable)),
        "HF_HUB_OFFLINE": "1",
    }
    out = str(tmp_path / "job.out")
    job = slurm.sbatch(
        [
            f"--output={out}",
            os.path.join(REPO, "slurm", "egrsd_tiny_cpu.sh"),
            f"data.train_path={data}",
            f"train.steps={STEPS}",
            "train.save_every=2",
            "rollout.max_new_tokens=16",
        ],
        env=env,
        cwd=REPO,
    )

    def report() -> str:
        return (
            f"\njob {job}: {slurm.job_info(job)}\n--- job output ---\n{_read(out)[-6000:]}"
            f"\n--- launcher.log ---\n{_read(os.path.join(run_dir, 'logs', 'launcher.log'))}"
        )

    # 1. It trains and checkpoints (every 2 steps; `latest` is written last, once the step folder is complete).
    info = slurm.wait_job(
        job,
        420,
        until=lambda i: _latest(run_dir) != "" or i.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING", None),
    )
    first = _latest(run_dir)
    assert re.fullmatch(r"step_\d{8}", first), "no checkpoint written" + report()
    assert info.get("JobState") == "RUNNING", "the job stopped before it could be preempted" + report()
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", first, "model")), report()
    assert _steps(run_dir)[:2] == [1, 2], report()

    # 2. Preempt: USR1 to the srun step (what `#SBATCH --signal=USR1@120` does).
    slurm.run(["scancel", "--signal=USR1", job])
    launcher_log = os.path.join(run_dir, "logs", "launcher.log")
    t0 = time.time()
    while "preempted: checkpoint saved (exit 42)" not in _read(launcher_log):
        assert time.time() - t0 < 240, "the trainer did not exit 42 after SIGUSR1" + report()
        assert slurm.job_info(job).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"), (
            "the job ended instead of being preempted" + report()
        )
        time.sleep(0.5)
    preempt_ckpt = _latest(run_dir)
    k = int(preempt_ckpt.split("_")[1])
    assert 2 <= k < STEPS, f"checkpoint at preemption: {preempt_ckpt} (the run was not stopped mid-way)" + report()
    assert _steps(run_dir) == list(range(1, k + 1)), report()

    # 3. Requeued, resumed from that checkpoint, finished.
    info = slurm.wait_job(job, 420)
    assert info.get("JobState") == "COMPLETED", report()
    assert info.get("Restarts") == "1", report()
    assert _steps(run_dir) == list(range(1, STEPS + 1)), "steps were lost or redone across the requeue" + report()
    assert _latest(run_dir) == f"step_{STEPS:08d}"
    log = _read(launcher_log)
    assert re.search(rf"job {job} restart 1\] launch: .*recipes/train.py", log), report()
    assert re.search(rf"resumed from .*{preempt_ckpt}", _read(out)), "the requeued job did not resume" + report()


@pytest.fixture(scope="module")
def gpu_script_job(slurm, tmp_path_factory):
    """Submit slurm/egrsd_qwen3_8b.sh itself (settings block, overrides, launcher call), venv runtime, on the
    tiny config; submitted before the preemption test so the two jobs run side by side (one CPU each).

    The node has no GPUs, so the size headers are overridden on the sbatch command line (which wins over
    #SBATCH lines; --oversubscribe lifts the header's --exclusive) and the config is the tiny CPU one with
    random init (the trailing arguments override the script's model.init_from=megatron).
    """
    from egrsd_megatron.cli import main

    tmp = tmp_path_factory.mktemp("gpu_script")
    data = str(tmp / "train.jsonl")
    assert main(["data", "synth", "--n", "16", "--out", data]) == 0
    run_dir, out = str(tmp / "run"), str(tmp / "job.out")
    env = {
        "EGRSD_REPO": REPO,
        "EGRSD_RUN_DIR": run_dir,
        "EGRSD_RUNTIME": "venv",
        "MASTER_PORT": free_port(),
        "EGRSD_CONFIG": "conf/tiny_cpu.yaml",
        "EGRSD_DATA": data,
        "EGRSD_VENV": os.path.dirname(os.path.dirname(sys.executable)),
        "HF_HUB_OFFLINE": "1",
    }
    job = slurm.sbatch(
        [
            f"--output={out}",
            "--nodes=1",
            "--ntasks-per-node=1",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--mem=2G",
            "--oversubscribe",
            os.path.join(REPO, "slurm", "egrsd_qwen3_8b.sh"),
            "model.init_from=random",
            "train.steps=1",
        ],
        env=env,
        cwd=REPO,
    )
    return {"job": job, "run_dir": run_dir, "out": out, "data": data}


@pytest.mark.slow
def test_gpu_training_script_runs_end_to_end_on_cpu(slurm, gpu_script_job):
    j = gpu_script_job
    info = slurm.wait_job(j["job"], 300)
    log = _read(os.path.join(j["run_dir"], "logs", "launcher.log"))
    assert info.get("JobState") == "COMPLETED", f"{info}\n{_read(j['out'])[-4000:]}\n{log}"
    assert _latest(j["run_dir"]) == "step_00000001" and _steps(j["run_dir"]) == [1]
    # The script's own overrides reached the trainer (data path from its settings block, resume=auto).
    assert f"data.train_path={j['data']}" in log and "train.resume=auto" in log and "model.load=" in log, log


def test_a_failing_job_is_not_requeued(slurm, tmp_path):
    """A non-42 exit (here: a config error, exit 2) fails the job; the launcher does not requeue it."""
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job.out")
    env = {
        "EGRSD_REPO": REPO,
        "EGRSD_RUN_DIR": run_dir,
        "EGRSD_RUNTIME": "venv",
        "MASTER_PORT": free_port(),
        "EGRSD_VENV": os.path.dirname(os.path.dirname(sys.executable)),
    }
    job = slurm.sbatch(
        [f"--output={out}", os.path.join(REPO, "slurm", "egrsd_tiny_cpu.sh"), "loss.name=nope"], env=env, cwd=REPO
    )
    info = slurm.wait_job(job, 180)
    log = _read(os.path.join(run_dir, "logs", "launcher.log"))
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", f"{info}\n{_read(out)}"
    assert info.get("Restarts") == "0"
    assert "FAILED: exit code 2 (not a preemption exit: no requeue)" in log, log
    assert "loss.name" in _read(out)  # the trainer's one-line config error reaches the job output


BATCH_SIGNAL_JOB = """#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
source "$EGRSD_REPO/slurm/launcher.sh"
egrsd_setup
egrsd_launch bash -c '
  if [[ ${SLURM_RESTART_COUNT:-0} -ge 1 ]]; then echo "second run: done"; exit 0; fi
  trap "echo task got USR1; exit 42" USR1
  touch "$EGRSD_RUN_DIR/ready"
  while true; do sleep 0.2; done'
"""


def test_signal_to_the_batch_shell_is_forwarded_to_the_tasks(slurm, tmp_path):
    """`--signal=B:USR1@..` / `scancel --batch` signal only the batch shell: the launcher's trap must forward it
    to srun and the tasks, then requeue on exit 42. A bash task stands in for the trainer (no Python start-up):
    this checks the launcher's signal plumbing, the training job above checks the trainer's side."""
    script = tmp_path / "job.sh"
    script.write_text(BATCH_SIGNAL_JOB)
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job.out")
    env = {
        "EGRSD_REPO": REPO,
        "EGRSD_RUN_DIR": run_dir,
        "EGRSD_RUNTIME": "venv",
        "EGRSD_VENV": os.path.dirname(os.path.dirname(sys.executable)),
    }
    job = slurm.sbatch([f"--output={out}", str(script)], env=env, cwd=REPO)
    slurm.wait_job(job, 120, until=lambda i: os.path.exists(os.path.join(run_dir, "ready")))
    slurm.run(["scancel", "--batch", "--signal=USR1", job])
    info = slurm.wait_job(job, 180)
    text, log = _read(out), _read(os.path.join(run_dir, "logs", "launcher.log"))
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", f"{info}\n{text}\n{log}"
    assert "batch shell got SIGUSR1: forwarding" in log and "preempted: checkpoint saved (exit 42)" in log, log
    assert "task got USR1" in text and "second run: done" in text, text
