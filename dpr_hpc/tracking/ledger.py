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
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from dpr_hpc.errors import LedgerWriteError, UsageError
from dpr_hpc.fsutil import append_line, resolved
from dpr_hpc.store.paths import StageStore
from dpr_hpc.locks import HEARTBEAT_S, LockFile
from dpr_hpc.planning.plan import StageJob
from dpr_hpc.provenance import now_iso

log = logging.getLogger(__name__)
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
        costs one short append however many jobs came before. A line that is not an entry (cut
        short by a crash, or by a full disk before appends were checked) is skipped with a
        warning naming it: one damaged line must not lock every command out. What it recorded
        is not lost for good: a job it named that is still queued carries the same tag as the
        job's next submission (nonce), so the next submit adopts it instead of queueing twice.
        A ledger that cannot be read at all is a one-line error (exit 2)."""
        path = store.ledger_file
        entries: dict[str, list[dict[str, Any]]] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return cls(path, entries)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: not readable as a ledger ({exc}); move it aside to start a new one") from None
        damaged = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry, parsed = json.loads(line), True
            except ValueError:
                entry, parsed = None, False
            if not _is_entry(entry):
                if parsed or number < len(lines):
                    damaged.append(number)  # a last append cut short by a crash was never confirmed: no warning
                continue
            entries.setdefault(entry.pop("job"), []).append(entry)
        if damaged:
            _warn_damaged(path, damaged)
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
        return hashlib.sha256(f"{resolved(self.path)}|{job.id}|{attempt}".encode()).hexdigest()[:NONCE_LENGTH]

    def array_tag(self, jobs: list[StageJob]) -> str:
        """The tag a job array carries, made of its tasks' nonces in index order: the same until
        any of them is recorded, so an array queued by a submit killed before its ledger write is
        found and adopted as a whole (slurm backend, <tag>.tasks.json)."""
        return hashlib.sha256("|".join(self.nonce(job) for job in jobs).encode()).hexdigest()[:NONCE_LENGTH]

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
        """Append and sync at once, so a submit that dies half-way keeps what it submitted. A
        line that cannot be written whole (a full disk, a quota) leaves nothing behind and
        stops the submit with one line saying what is queued but unrecorded."""
        entry = {"job_id": job_id, "submitted_at": now_iso(), "backend": backend, "user": getpass.getuser(), **extra}
        try:
            append_line(self.path, json.dumps({"job": job.id, **entry}, sort_keys=True))
        except OSError as exc:
            raise LedgerWriteError(
                f"{self.path}: could not record {backend} job {job_id} of {job.id} ({exc.strerror or exc}); nothing half-written "
                "was left, and the next submit finds the queued job by its tag and records it") from None
        self.entries.setdefault(job.id, []).append(entry)


# (ledger file, line) already warned about by this process: status --watch reads it every redraw.
_WARNED: set[tuple[str, int]] = set()


def _warn_damaged(path: Path, numbers: list[int]) -> None:
    new = [n for n in numbers if (str(path), n) not in _WARNED]
    if not new:
        return
    _WARNED.update((str(path), n) for n in new)
    shown = ", ".join(str(n) for n in new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
    log.warning("warning: %s: line%s %s %s not a ledger entry; skipped (the rest of the ledger is read)",
                path, "s" if len(new) > 1 else "", shown, "are" if len(new) > 1 else "is")


def _is_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("job"), str) and isinstance(entry.get("job_id"), str) and isinstance(entry.get("submitted_at"), str)
