"""Progress of a long loop: a tqdm bar on a terminal, one plain line per update elsewhere.

A bar redrawn with carriage returns turns a log file (Slurm, `egrsd experiment`'s children, CI) into one
unreadable line, so off a terminal each update prints `desc: n/total unit, rate, ETA` on its own line.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm import tqdm


def interactive() -> bool:
    """True when both stdout and stderr are terminals (a progress bar can redraw in place)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it") -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self._start_n, self._t0 = initial, time.monotonic()
        self._bar: Optional[tqdm] = None
        if interactive():
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        dt = time.monotonic() - self._t0
        rate = (self.n - self._start_n) / dt if dt > 0 else 0.0
        eta = f"{(self.total - self.n) / rate:.0f}s" if rate > 0 else "?"
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s, {rate:.2f} {self.unit}/s, ETA {eta}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
