"""Running `egrsd` commands as child processes: one process, or torchrun over several (shared by
`egrsd experiment` and recipes/demo.py).

The children run `python -m egrsd_megatron.cli ...` (under `python -m torch.distributed.run` for more
than one process) with HF_HUB_OFFLINE=1 and unbuffered output, so their progress lines reach the console
as they happen; a non-zero exit raises `LaunchError` naming the phase and the command.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from typing import List, Mapping, Optional, Sequence

from ..utils.net import free_port


class LaunchError(RuntimeError):
    def __init__(self, phase: str, cmd: Sequence[str], code: int):
        self.phase, self.cmd, self.code = phase, list(cmd), code
        super().__init__(f"phase '{phase}' failed with exit code {code}: {format_cmd(cmd)}")


def format_cmd(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def egrsd_cmd(*args: str) -> List[str]:
    """`egrsd ARGS` in one process, with this interpreter."""
    return [sys.executable, "-m", "egrsd_megatron.cli", *args]


def torchrun_cmd(nproc: int, *args: str, script: Optional[str] = None) -> List[str]:
    """`torchrun --nproc-per-node N` of `egrsd ARGS` (or of `script ARGS` when a script path is given)."""
    target = [script] if script else ["-m", "egrsd_megatron.cli"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *target,
        *args,
    ]


def train_cmd(nproc: int, config: str, overrides: Sequence[str]) -> List[str]:
    """`egrsd train CONFIG OVERRIDES` in one process, or under torchrun for nproc > 1."""
    return egrsd_cmd("train", config, *overrides) if nproc == 1 else torchrun_cmd(nproc, "train", config, *overrides)


def child_env(extra: Optional[Mapping[str, str]] = None) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_phase(
    phase: str, cmd: Sequence[str], cwd: Optional[str] = None, env: Optional[Mapping[str, str]] = None
) -> float:
    """Run `cmd` to completion, echoing it first; returns its wall seconds; raises LaunchError on failure."""
    print(f"\n=== {phase}\n$ {format_cmd(cmd)}", flush=True)
    t = time.monotonic()
    r = subprocess.run(list(cmd), cwd=cwd, env=child_env(env))
    dt = time.monotonic() - t
    if r.returncode != 0:
        raise LaunchError(phase, cmd, r.returncode)
    print(f"=== {phase}: {dt:.0f} s", flush=True)
    return dt
