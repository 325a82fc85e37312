"""Preemption: SIGTERM / SIGUSR1 ask the trainer to finish the current step, save and exit 42.

Slurm sends SIGUSR1 `--signal=USR1@120` seconds before the time limit (and SIGTERM on preemption); the
launcher (slurm/launcher.sh) requeues the job when the trainer exits with REQUEUE_EXIT_CODE.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 42


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> "PreemptionFlag":
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.signum is None:
            log.warning(
                "received %s: finishing this step, then checkpoint and exit %d",
                signal.Signals(signum).name,
                REQUEUE_EXIT_CODE,
            )
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
