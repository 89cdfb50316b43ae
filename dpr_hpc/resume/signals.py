"""Stop requests: the signals SLURM sends before a job is stopped, turned into a flag that the
training loop reads at its next step boundary.

SLURM sends the warning signal (`--signal=USR2@<delay>`) before the time limit and on
preemption, and SIGTERM when it kills a job (`scancel`, `scontrol requeue`, the limit itself).
submitit's own USR2 handler checkpoints and requeues at once, wherever the program happens to
be, possibly in the middle of an optimizer step. We hold the signal instead, let the step
finish, write the checkpoint, and only then hand the signal to submitit, which requeues the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime
from types import FrameType
from typing import Any, Callable, Protocol

WARNING_SIGNAL = signal.SIGUSR2  # submitit's default for --signal
STOP_SIGNALS = (WARNING_SIGNAL, signal.SIGTERM)
SIGNAL_DELAY_ENV = "DPR_HPC_SIGNAL_DELAY_S"


class StopRequest:
    """Set by a stop signal; `requested()` is what the training loop polls at step boundaries.

    SIGTERM stops at the next step. The warning signal means "the time limit is near": SLURM
    may send it up to 60 s earlier than `--signal` asks, so under SLURM the training goes on
    until the job's end time minus the configured delay (DPR_HPC_SIGNAL_DELAY_S, which the
    SLURM backend exports), and stops at once where the end time is unknown.
    """

    def __init__(self, end_time: Callable[[], float | None] | None = None, margin_s: float | None = None) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._end_time = end_time or slurm_job_end_time
        self._margin_s = margin_s if margin_s is not None else _env_float(SIGNAL_DELAY_ENV)
        self._stop_at: float | None = None

    def requested(self) -> bool:
        if self.signum is None:
            return False
        if self.signum != WARNING_SIGNAL:
            return True
        if self._stop_at is None:
            end = self._end_time() if self._margin_s else None
            self._stop_at = time.time() if end is None else end - float(self._margin_s or 0)
            if self._stop_at > time.time():
                print(f"training on until {self._margin_s:g}s before the job's end time", flush=True)
        return time.time() >= self._stop_at

    @property
    def reason(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def hand_over(self) -> None:
        """Give a held warning signal to the handler that was there before us: under submitit,
        that handler calls the job's `checkpoint` method, requeues it and exits. Without one
        (a plain process) this returns and the caller exits."""
        previous = self._previous.get(WARNING_SIGNAL)
        self.restore()
        if self.signum == WARNING_SIGNAL and callable(previous):
            previous(WARNING_SIGNAL, None)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None or signum != WARNING_SIGNAL:
            print(f"caught {signal.Signals(signum).name}: checkpointing at a step boundary", flush=True)
            self.signum = signum


def slurm_job_end_time() -> float | None:
    """This SLURM job's end time (its start plus its limit) as a POSIX time, or None."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=30).stdout.strip()
        return datetime.fromisoformat(out).timestamp()  # squeue prints local time
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def _env_float(name: str) -> float | None:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return None


class TrainingInterrupted(Exception):
    """A stop signal arrived; the state at the last finished step is in a checkpoint."""

    def __init__(self, reason: str, step: int, checkpoint: str) -> None:
        super().__init__(f"stopped by {reason} after step {step}; resumable from {checkpoint}")
        self.reason, self.step, self.checkpoint = reason, step, checkpoint


class Stopper(Protocol):
    """What the training loop asks at each step boundary; tests pass their own."""

    reason: str

    def requested(self) -> bool: ...


class NeverStop:
    """For runs that no signal may interrupt (in-process calls)."""

    reason = ""

    def requested(self) -> bool:
        return False


# The test hook that makes a training outlast a run by construction instead of by an epoch count
# tuned to one CPU: while the file this names exists, the training waits at each step boundary
# (after the step, before the stop check), so a stop signal still checkpoints and requeues it.
# Waiting, it creates the file's name plus PARKED_SUFFIX, so a test knows it stands there.
HOLD_ENV = "DPR_HPC_HOLD_TRAINING"
PARKED_SUFFIX = ".parked"


def wait_while_held(stop: Stopper, poll_s: float = 0.1) -> None:
    """Block while $DPR_HPC_HOLD_TRAINING names an existing file and no stop was requested."""
    gate = os.environ.get(HOLD_ENV)
    if gate:
        _park(gate, stop, poll_s)


def _park(gate: str, stop: Stopper, poll_s: float) -> None:
    """Wait while `gate` exists and no stop was requested, with FILE.parked saying so."""
    if not os.path.exists(gate):
        return
    with open(gate + PARKED_SUFFIX, "a"):
        pass
    while os.path.exists(gate) and not stop.requested():
        time.sleep(poll_s)


# The same hook for index and infer, which have no step boundary to wait at: while the file that
# $DPR_HPC_HOLD_STAGE names for a stage ("index=FILE,infer=FILE") exists, a job of that stage
# waits once it holds its claim, before its work, so a test can requeue or cancel it while it
# runs, however short its work is.
HOLD_STAGE_ENV = "DPR_HPC_HOLD_STAGE"


def wait_while_stage_held(stage: str, poll_s: float = 0.1) -> None:
    """Block while $DPR_HPC_HOLD_STAGE names an existing file for `stage` (FILE.parked says so)."""
    for entry in os.environ.get(HOLD_STAGE_ENV, "").split(","):
        name, _, gate = entry.partition("=")
        if name == stage and gate:
            _park(gate, NeverStop(), poll_s)
