"""The ledger: every scheduler job id each stage job has had, written under a lock file.

It lets `status`, `cancel` and a later `submit` work from any shell at any time, with no
process kept alive, and it is what stops two concurrent submits from submitting a stage twice:
a submit holds the lock from reading the ledger until it has recorded what it submitted.
"""

from __future__ import annotations

import getpass
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from dpr_hpc.errors import UsageError
from dpr_hpc.fsutil import read_json, write_json_atomic
from dpr_hpc.layout import RunLayout
from dpr_hpc.locks import HEARTBEAT_S, LockFile
from dpr_hpc.plan import StageJob
from dpr_hpc.provenance import now_iso

LOCK_TIMEOUT_S = 600
# How long a submitted job may go unlisted by sacct and squeue before it counts as gone: sacct
# lags fresh submissions, and without accounting squeue forgets jobs once they end.
UNLISTED_GRACE_S = 300


@dataclass
class Ledger:
    path: Path
    entries: dict[str, list[dict[str, Any]]]

    @classmethod
    def read(cls, layout: RunLayout) -> "Ledger":
        """Raises UsageError (one line, exit 2) when ledger.json is not a ledger."""
        path = layout.root / "ledger.json"
        if not path.is_file():
            return cls(path, {})
        try:
            entries = read_json(path)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not readable as a ledger ({exc}); move it aside to start a new one") from None
        if not isinstance(entries, dict) or not all(_is_history(h) for h in entries.values()):
            raise UsageError(f"{path}: not a ledger (expected a mapping of stage jobs to lists of submissions)")
        return cls(path, entries)

    @classmethod
    @contextmanager
    def locked(cls, layout: RunLayout) -> Iterator["Ledger"]:
        layout.root.mkdir(parents=True, exist_ok=True)
        lock = LockFile(layout.root / "ledger.lock", purpose="ledger", heartbeat_s=HEARTBEAT_S, timeout_s=LOCK_TIMEOUT_S)
        with lock:
            yield cls.read(layout)

    def latest(self, job: StageJob) -> dict[str, Any] | None:
        history = self.entries.get(job.key)
        return history[-1] if history else None

    def recently_submitted(self, job: StageJob, now: datetime | None = None) -> bool:
        latest = self.latest(job)
        if latest is None:
            return False
        submitted = datetime.fromisoformat(latest["submitted_at"])
        return ((now or datetime.now(timezone.utc)) - submitted).total_seconds() < UNLISTED_GRACE_S

    def first_submission(self) -> datetime | None:
        """When the first job of this ledger was submitted: sacct need look no further back."""
        times = [datetime.fromisoformat(e["submitted_at"]) for history in self.entries.values() for e in history]
        return min(times) if times else None

    def users(self) -> list[str]:
        """Who submitted this ledger's jobs (a group may share a run folder); this user for
        entries from before users were recorded."""
        return sorted({e.get("user") or getpass.getuser() for history in self.entries.values() for e in history})

    def latest_ids(self) -> dict[str, str]:
        return {key: history[-1]["job_id"] for key, history in self.entries.items() if history}

    def record(self, job: StageJob, job_id: str, backend: str = "slurm") -> None:
        """Append and write at once, so a submit that dies half-way keeps what it submitted."""
        self.entries.setdefault(job.key, []).append({"job_id": job_id, "submitted_at": now_iso(), "backend": backend, "user": getpass.getuser()})
        write_json_atomic(self.path, self.entries)


def _is_history(history: Any) -> bool:
    return isinstance(history, list) and all(
        isinstance(entry, dict) and isinstance(entry.get("job_id"), str) and isinstance(entry.get("submitted_at"), str)
        for entry in history
    )
