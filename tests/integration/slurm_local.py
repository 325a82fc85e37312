"""A real single-node Slurm on localhost for tests: install, configure, start, stop.

Debian's `slurm-wlm` (22.05) and `munge` run as root without systemd or cgroups (facts and pitfalls in
docs/cluster.md). Everything lives in one private folder: its own munge key and socket, slurm.conf, free
TCP ports, state/spool/log/pid files. So a run never touches /etc/slurm or a system munged, and two runs
on one machine do not collide. Daemons are stopped by their PIDs (never by name).

    with LocalSlurm(tmp_dir) as slurm:
        job = slurm.sbatch(["--wrap", "hostname"])
        slurm.wait_job(job, timeout_s=60)

`python -m tests.integration.slurm_local DIR` starts one and waits (Ctrl-C stops it): handy to try the
sbatch scripts by hand (`export SLURM_CONF=DIR/slurm.conf`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from egrsd_megatron.utils.net import free_port as _free_port

REQUIRED = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun", "slurmctld", "slurmd", "munged", "munge")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed here (not root, no apt-get, install failed): the reason says which.

    Tests skip on this one only; a daemon that is installed but does not come up is a failure (RuntimeError).
    """


def _which_all() -> List[str]:
    paths = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [c for c in REQUIRED if shutil.which(c, path=paths) is None]


def ensure_installed(timeout_s: float = 300) -> None:
    """Install slurm-wlm and munge with apt-get when missing; raise SlurmUnavailable saying why not."""
    if not _which_all():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"Slurm/munge not installed ({', '.join(_which_all())} missing) and not root, "
            "so apt-get cannot install them"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm/munge not installed and there is no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"],
    ):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` took over {timeout_s:.0f} s (no package mirror?)") from None
        if r.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (rc {r.returncode}): {r.stderr.strip()[-400:]}")
    missing = _which_all()
    if missing:
        raise SlurmUnavailable(f"after apt-get install, still missing: {', '.join(missing)}")


def free_port() -> str:
    """A TCP port free right now (for MASTER_PORT of a job), as a string for an environment."""
    return str(_free_port())


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "<no file>"


class LocalSlurm:
    """One slurmctld + one slurmd (node = this host, `cpus` CPUs) + a private munged, under `root`."""

    def __init__(self, root: str, cpus: int = 2, partition: str = "debug") -> None:
        self.root = os.path.abspath(root)
        self.cpus = cpus
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.root, "slurm.conf")
        # munged wants every folder above its socket to be searchable by all: a private folder in /tmp,
        # not under `root` (pytest's tmp folders are mode 0700). Made in start(), removed in stop().
        self.munge_dir = ""
        self.munge_socket = ""
        self._started: List[str] = []  # pid files of daemons we started, in start order

    # ----- environment for clients (sbatch, squeue, ...) -----
    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        e = dict(os.environ)
        e["SLURM_CONF"] = self.conf
        e["PATH"] = e.get("PATH", "") + ":/usr/sbin:/sbin"
        # Jobs launched from inside a test must not think they are already inside a Slurm job.
        for k in [k for k in e if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del e[k]
        e.update(extra or {})
        return e

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(
            list(cmd), env=kw.pop("env", None) or self.env(), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (rc {r.returncode}): {r.stderr.strip()}\n{self.logs()}")
        return r

    # ----- start / stop -----
    def _write_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir = tempfile.mkdtemp(prefix="egrsd-munge-", dir="/tmp")
        self.munge_socket = os.path.join(self.munge_dir, "munge.socket")
        os.chmod(self.munge_dir, 0o755)
        key = os.path.join(self.munge_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        for p in (self.munge_dir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)

    def _write_conf(self) -> None:
        mem_mb = int(int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) / 1024 * 0.9)
        d = self.root
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        lines = [
            "ClusterName=egrsdtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CryptoType=crypto/munge",
            # A private munged socket; short credential life so a requeued job restarts in ~10 s, not ~3 min.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "MailProg=/bin/true",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "JobFileAppend=1",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "KillWait=5",
            "MinJobAge=600",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.log",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _wait(self, what: str, ok, timeout_s: float, fail=None) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if ok():
                return
            if fail is not None and fail():
                break
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s\n{self.logs()}")

    def start(self, timeout_s: float = 60) -> "LocalSlurm":
        ensure_installed()
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()  # whatever came up goes down again
            raise

    def _start(self, timeout_s: float) -> "LocalSlurm":
        os.makedirs(self.root, exist_ok=True)
        # A pid file left by an earlier run in this folder must not make stop() signal an unrelated process.
        for name in ("slurmctld.pid", "slurmd.pid"):
            if os.path.exists(os.path.join(self.root, name)):
                os.remove(os.path.join(self.root, name))
        self._write_munge()
        self._write_conf()
        md = self.munge_dir
        self._started.append(f"{md}/munged.pid")
        # munged refuses to run as root ("Logfile is insecure"): run it as the munge user.
        r = subprocess.run(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "/usr/sbin/munged",
                f"--socket={self.munge_socket}",
                f"--key-file={md}/munge.key",
                f"--pid-file={md}/munged.pid",
                f"--log-file={md}/munged.log",
                f"--seed-file={md}/munged.seed",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            raise RuntimeError(f"munged did not start: {r.stderr.strip()}")
        self._wait(
            "munged",
            lambda: (
                subprocess.run(
                    f"munge -n -S {self.munge_socket} | unmunge -S {self.munge_socket}", shell=True, capture_output=True
                ).returncode
                == 0
            ),
            15,
        )
        env = self.env()
        self._started.append(f"{self.root}/slurmctld.pid")
        subprocess.run(["/usr/sbin/slurmctld", "-f", self.conf], env=env, check=True, capture_output=True, timeout=30)
        self._wait("slurmctld", lambda: "UP" in self.run(["scontrol", "ping"], check=False).stdout, timeout_s)
        self._started.append(f"{self.root}/slurmd.pid")
        subprocess.run(
            ["/usr/sbin/slurmd", "-f", self.conf, "-N", self.node], env=env, check=True, capture_output=True, timeout=30
        )

        def state() -> str:
            return self.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], check=False).stdout.strip()

        self._wait(
            "slurmd (node idle)",
            lambda: state() == "idle",
            timeout_s,
            fail=lambda: any(s in state() for s in ("inval", "drain", "down")),
        )
        return self

    def stop(self, timeout_s: float = 15) -> None:
        """Stop the daemons we started, newest first, by PID: TERM, then KILL after `timeout_s`."""
        self._stop_daemons(timeout_s)
        if self.munge_dir:
            log_file = os.path.join(self.munge_dir, "munged.log")
            if os.path.exists(log_file) and os.path.isdir(os.path.join(self.root, "log")):
                shutil.copy(log_file, os.path.join(self.root, "log", "munged.log"))  # keep it for debugging
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = ""

    def _stop_daemons(self, timeout_s: float) -> None:
        while self._started:
            pid_file = self._started.pop()
            try:
                pid = int(open(pid_file).read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            t0 = time.time()
            while time.time() - t0 < timeout_s:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- jobs -----
    def sbatch(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> str:
        r = self.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd)
        return r.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} when unknown."""
        r = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        info: Dict[str, str] = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait_job(self, job_id: str, timeout_s: float, until=None) -> Dict[str, str]:
        """Poll every second until the job has left the queue (or `until(info)` is true); scancel on timeout.

        (`sbatch --wait` polls at 2 s, 10 s, then every 32 s: too coarse for a test.)
        """
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            info = self.job_info(job_id)
            if until is not None and until(info):
                return info
            if until is None and info.get("JobState") in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
                "BOOT_FAIL",
                "DEADLINE",
            ):
                return info
            time.sleep(1)
        self.run(["scancel", job_id], check=False)
        raise TimeoutError(
            f"job {job_id} not done within {timeout_s:.0f} s (cancelled): {self.job_info(job_id)}\n{self.logs()}"
        )

    def cancel_all(self, timeout_s: float = 30) -> None:
        """Cancel every job of this Slurm and wait until none is left running (before stopping the daemons:
        a stopped slurmd leaves its job steps running)."""
        if not self._started:
            return
        ids = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        if ids:
            self.run(["scancel", *ids], check=False)
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            r = self.run(["squeue", "-h", "-o", "%i"], check=False)
            if r.returncode == 0 and not r.stdout.strip():
                return
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{_tail(os.path.join(self.root, p))}"
            for name, p in (
                ("slurmctld", "log/slurmctld.log"),
                ("slurmd", "log/slurmd.log"),
                ("munged", os.path.join(self.munge_dir, "munged.log") if self.munge_dir else "log/munged.log"),
            )
        )


if __name__ == "__main__":
    import sys

    d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/egrsd-slurm"
    with LocalSlurm(d) as s:
        print(f"Slurm up: export SLURM_CONF={s.conf}   (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
