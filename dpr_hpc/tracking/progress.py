"""Live progress of a running stage job, for a progress bar with an ETA.

A stage counts its work (training steps, passages encoded) into a `Meter`, which writes the
count to its attempt's meter.json at most once a second. The job's own log keeps the plain
progress lines (stages.common.progress): a bar's carriage returns would clutter a batch log.
The bar is drawn by whoever watches from a terminal: the local backend, while it waits on each
job it runs, when its stderr is a terminal or DPR_HPC_PROGRESS=bar asks for it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from dpr_hpc.errors import UsageError
from dpr_hpc.fsutil import write_json_atomic
from dpr_hpc.store.markers import read_marker
from dpr_hpc.store.paths import JobFolder

PROGRESS_ENV = "DPR_HPC_PROGRESS"
PROGRESS_MODES = ("bar", "lines")
WRITE_EVERY_S = 1.0


class Meter:
    """Counts one kind of work of a stage (`what`, out of `total`) into `path`."""

    def __init__(self, path: Path, what: str, unit: str, total: int, done: int = 0, before_write: Callable[[], None] | None = None) -> None:
        """`before_write` raises when the job may no longer write (its claim was lost)."""
        self.path, self.what, self.unit, self.total = path, what, unit, total
        self._written_at = 0.0
        self._before_write = before_write or (lambda: None)
        # Seconds spent writing the meter file. Its updates are called inside the TTT and PEI
        # loops, and a write (an fsync'd rename) took ~12 ms on the demo's disk: ~1% of a demo
        # training, 1.5% of a demo PEI. The stages take each write's seconds out of their timers
        # (`update` returns them) and record the sum as `meter_write_s`.
        self.write_s = 0.0
        self.update(done, force=True)
        self.write_s = 0.0  # the first write comes before the timed loop

    def update(self, done: int, force: bool = False) -> float:
        """Write the count if a second has passed (or `force`, or at the end); returns the
        seconds the write took (0.0 when there was none), for the caller's timer to leave out."""
        now = time.perf_counter()
        if force or done >= self.total or now - self._written_at >= WRITE_EVERY_S:
            self._before_write()
            write_json_atomic(self.path, {"what": self.what, "unit": self.unit, "done": done, "total": self.total})
            self._written_at = now
            spent = time.perf_counter() - now
            self.write_s += spent
            return spent
        return 0.0


def bars_wanted() -> bool:
    """A bar where a person watches (stderr is a terminal), or where DPR_HPC_PROGRESS says."""
    mode = os.environ.get(PROGRESS_ENV, "")
    if mode and mode not in PROGRESS_MODES:
        raise UsageError(f"{PROGRESS_ENV}={mode}: expected {' or '.join(PROGRESS_MODES)}")
    return mode == "bar" or (not mode and sys.stderr.isatty())


class MeterBar:
    """A tqdm bar that follows the meter of a job's newest attempt, one bar per kind of work."""

    def __init__(self, folder: JobFolder, label: str) -> None:
        self.folder = folder
        self.label = label
        self._bar: Any = None
        self._what: str | None = None

    def refresh(self) -> None:
        attempt = self.folder.latest_attempt()
        reading = read_marker(attempt.meter) if attempt else None
        if not reading:
            return
        if reading["what"] != self._what:
            self.close()
            from tqdm import tqdm

            # initial: a resumed job's steps done before this run do not count towards the rate
            self._bar = tqdm(total=reading["total"], initial=reading["done"], unit=reading["unit"],
                             desc=f"{self.label} {reading['what']}", file=sys.stderr, leave=False, dynamic_ncols=True)
            self._what = reading["what"]
        self._bar.update(reading["done"] - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._what = None, None
