"""The marker files a stage job leaves in its attempt when it fails or stops, and how they are
read: status tells FAILED and INTERRUPTED apart by them, and submit resumes an interrupted
attempt rather than repeating a failure."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from dpr_hpc.fsutil import read_json, write_json_atomic
from dpr_hpc.provenance import now_iso
from dpr_hpc.store.paths import AttemptPaths, JobFolder


def mark_failed(paths: AttemptPaths, error: BaseException) -> None:
    write_json_atomic(paths.failure, {"error": f"{type(error).__name__}: {error}", "finished_at": now_iso(), "host": socket.gethostname()})


def mark_interrupted(paths: AttemptPaths, reason: str) -> None:
    """Stopped by a signal after writing a checkpoint: not a failure, the next job resumes it."""
    write_json_atomic(paths.interrupted, {"reason": reason, "finished_at": now_iso(), "host": socket.gethostname()})


def resumable(folder: JobFolder) -> bool:
    """Stopped by a signal (time limit with its requeues spent, scancel) after saving its state,
    and not failed: submitting it again continues it rather than repeating a failure."""
    attempt = folder.latest_attempt()
    return attempt is not None and attempt.interrupted.exists() and not attempt.failure.exists() and not attempt.record.exists()


def read_marker(path: Path) -> dict[str, Any] | None:
    """A marker's JSON, or None where it is absent or torn (a job killed while writing it)."""
    try:
        return read_json(path)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
