"""The ledger: every scheduler job id each stage job has had, one per runs root (grids share
stage jobs, so they share the record of what was queued), written under a lock file.

It lets `status`, `cancel` and a later `submit` work from any shell at any time, with no
process kept alive, and it is what stops two concurrent submits from submitting a stage twice:
a submit holds the lock from reading the ledger until it has recorded what it submitted.
"""

from __future__ import annotations

import hashlib
import json
import getpass
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from dpr_hpc.errors import UsageError
from dpr_hpc.fsutil import append_line
from dpr_hpc.store import StageStore
from dpr_hpc.locks import HEARTBEAT_S, LockFile
from dpr_hpc.plan import StageJob
from dpr_hpc.provenance import now_iso

LOCK_TIMEOUT_S = 600
NONCE_LENGTH = 16
# How long a submitted job may go unlisted by sacct and squeue before it counts as gone: sacct
# lags fresh submissions, and without accounting squeue forgets jobs once they end.
UNLISTED_GRACE_S = 300


@dataclass
class Ledger:
    path: Path
    entries: dict[str, list[dict[str, Any]]]

    @classmethod
    def read(cls, store: StageStore) -> "Ledger":
        """The ledger is an append-only log, one JSON line per submission, so recording a job
        costs one short append however many jobs came before. A last line cut short by a crash
        is ignored; anything else unreadable is a one-line error (exit 2)."""
        path = store.ledger_file
        entries: dict[str, list[dict[str, Any]]] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return cls(path, entries)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: not readable as a ledger ({exc}); move it aside to start a new one") from None
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                if number == len(lines):
                    break  # an append cut short by a crash: that submission was never confirmed
                raise UsageError(f"{path}: line {number} is not a ledger entry; move the file aside to start a new one") from None
            if not _is_entry(entry):
                raise UsageError(f"{path}: line {number} is not a ledger entry (expected job, job_id and submitted_at)")
            entries.setdefault(entry.pop("job"), []).append(entry)
        return cls(path, entries)

    @classmethod
    @contextmanager
    def locked(cls, store: StageStore) -> Iterator["Ledger"]:
        store.root.mkdir(parents=True, exist_ok=True)
        lock = LockFile(store.ledger_lock, purpose="ledger", heartbeat_s=HEARTBEAT_S, timeout_s=LOCK_TIMEOUT_S)
        with lock:
            yield cls.read(store)

    def latest(self, job: StageJob) -> dict[str, Any] | None:
        history = self.entries.get(job.id)
        return history[-1] if history else None

    def nonce(self, job: StageJob) -> str:
        """The tag the job's next sbatch carries (in --comment): the same until that submission is
        recorded, so a submit killed between sbatch and this ledger's write finds the job it
        queued by its tag, and adopts it instead of queueing a second copy."""
        attempt = len(self.entries.get(job.id, []))
        return hashlib.sha256(f"{self.path.resolve()}|{job.id}|{attempt}".encode()).hexdigest()[:NONCE_LENGTH]

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
        return {job_id: history[-1]["job_id"] for job_id, history in self.entries.items() if history}

    def record(self, job: StageJob, job_id: str, backend: str = "slurm", **extra: Any) -> None:
        """Append and sync at once, so a submit that dies half-way keeps what it submitted."""
        entry = {"job_id": job_id, "submitted_at": now_iso(), "backend": backend, "user": getpass.getuser(), **extra}
        self.entries.setdefault(job.id, []).append(entry)
        append_line(self.path, json.dumps({"job": job.id, **entry}, sort_keys=True))


def _is_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("job"), str) and isinstance(entry.get("job_id"), str) and isinstance(entry.get("submitted_at"), str)
