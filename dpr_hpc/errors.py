"""Every exception dpr-hpc raises for a caller to catch, in one place, so a caller (the CLI, the
service layer, a notebook) finds them without knowing which module raises them. The CLI maps each
DprHpcError to an exit code and a one-line message; the others (a checkpoint, a data file, the
hub) are ValueErrors or plain exceptions that the command wraps with the file and key they
concern. Two control-flow signals stay where they are raised and caught: a training's stop
(resume.signals.TrainingInterrupted) and a probe's out-of-memory (modeling.batch_probe.OutOfMemory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class DprHpcError(Exception):
    """Base class: anything dpr-hpc reports to the user without a traceback."""

    exit_code = 1


class GridError(DprHpcError):
    """The grid file (or a command-line argument) is malformed: exit code 2, nothing started."""

    exit_code = 2

    def __init__(self, file: str, key_path: str, expected: str) -> None:
        self.file = file
        self.key_path = key_path
        self.expected = expected
        where = f"{file}: {key_path}" if key_path else file
        super().__init__(f"{where}: {expected}")


class UsageError(DprHpcError):
    """A command-line argument is wrong (a missing run folder, an unknown cell)."""

    exit_code = 2



# The store, its locks and claims, and the ledger of submissions.
class LockHeldError(DprHpcError):
    """The lock stayed held by someone else until the timeout; says who."""

    def __init__(self, path: Path, purpose: str, holder: dict | None, waited_s: float, who: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"{path}: cannot take the lock for {purpose} after {waited_s:.0f}s: {who}")


class StageClaimedError(DprHpcError):
    """Another process holds this stage job's claim; this copy did nothing."""

    exit_code = 4


class ClaimLostError(DprHpcError):
    """Another copy took this job's claim while this one ran; this one stops, writing nothing more."""

    exit_code = 4


class RecordUnreadableError(DprHpcError):
    """A record, or a file it is checked against (an artifact, an input, an upstream record),
    exists but cannot be read (EIO, ESTALE, permissions, broken JSON). Nothing is submitted:
    rerunning would overwrite outputs on a guess."""

    exit_code = 1


class LedgerWriteError(DprHpcError):
    """A submission could not be recorded (ENOSPC, EDQUOT, EIO): the submit stops (exit 1)."""



# The scheduler and submission.
class SchedulerError(DprHpcError):
    """A SLURM command failed; its last line of output is the message (exit code 1 if uncaught)."""


class SchedulerUnreachableError(DprHpcError):
    """Neither sacct nor squeue answered: job states are unknown, so nothing may be inferred."""

    def __init__(self, message: str) -> None:
        super().__init__(f"scheduler unreachable: {message}")


class SubmissionError(DprHpcError):
    """sbatch kept failing; what was submitted before it stays in the ledger."""



# Inputs: data files, models and their checkpoints, the hub.
class DataFormatError(ValueError):
    """The file is not in DPR's biencoder format; the message names the record and key."""


class DataChangedError(ValueError):
    """The data file was rewritten in place while it was parsed: nothing is filed."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: weights missing or not the model's, or a
    DPR config whose class cannot be told. The message names the checkpoint and the weights."""


class HubUnreachableError(Exception):
    """A hub model that cannot be fetched from here; the message says why."""

    def __init__(self, model: str, reason: str, pinned: str | None = None) -> None:
        self.model = model
        self.reason = reason
        self.pinned = pinned  # the commit the runs root pins it to, when that was what failed
        super().__init__(f"{model}: {reason}")


class PretrainedMissing(DprHpcError):
    """The package that ships the demo's pre-trained checkpoint is not installed, or lacks it:
    the CLI says so in one line (dpr_hpc.errors)."""



# Stage jobs.
class StageInputError(DprHpcError):
    """An upstream output this job reads is not complete (or its record cannot be read)."""


class CheckpointWriteError(DprHpcError):
    """A checkpoint the stage cannot go on without (at a stop signal, or the final save) was
    not written; periodic ones that fail only log a warning."""
