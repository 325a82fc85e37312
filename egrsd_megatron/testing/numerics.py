"""The numerical settings of a test process: torch's thread count and deterministic mode.

Two settings change which kernels (and so which reduction orders) a CPU run uses, and a test run names
both explicitly rather than inheriting them from the machine:

* `OMP_NUM_THREADS`: when set, every rank (and the pytest process) uses that many intra-op threads;
  unset, a rank of `world_size` uses cpu_count // world_size (at least 1), so ranks don't oversubscribe
  the cores. The thread count changes how BLAS and torch split reductions, so results are only
  bitwise-repeatable at a fixed thread count; the suite's cross-layout tolerances are derived to hold
  at any (see egrsd_megatron/testing/tolerance.py).
* `EGRSD_DETERMINISTIC=1`: `torch.use_deterministic_algorithms(True)` (ops without a deterministic
  implementation then raise instead of silently varying).
"""

from __future__ import annotations

import os

import torch

DETERMINISTIC_ENV = "EGRSD_DETERMINISTIC"


def thread_count(world_size: int = 1) -> int:
    """OMP_NUM_THREADS when set (a positive integer), else max(1, cpu_count // world_size)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"OMP_NUM_THREADS={env!r}: expected a positive integer (or unset it)")
        return n
    return max(1, (os.cpu_count() or 1) // world_size)


def deterministic_requested() -> bool:
    """True when EGRSD_DETERMINISTIC is set to 1."""
    return os.environ.get(DETERMINISTIC_ENV, "").strip() == "1"


def apply_deterministic() -> None:
    """torch.use_deterministic_algorithms(True) when EGRSD_DETERMINISTIC=1; else leave torch's setting."""
    if deterministic_requested():
        torch.use_deterministic_algorithms(True)


def apply_numerics(world_size: int = 1) -> None:
    """Set this process's torch thread count and deterministic mode from the environment (see above)."""
    torch.set_num_threads(thread_count(world_size))
    apply_deterministic()
