"""Locks that hold on the shared filesystems where run folders live.

flock (what `filelock` uses) is not one: on Lustre mounted `noflock` it raises, with
`localflock` (and on BeeGFS by default) it locks on one node only, so two login nodes could
submit the same grid. A lock here is a file created with O_CREAT|O_EXCL, which the file server
decides atomically on NFS (v3 on), Lustre, BeeGFS and GPFS alike. The file says who holds it:
host, pid, SLURM job id, purpose, when it was taken and when the holder last proved it was
alive (its heartbeat).

A lock is stale, and may be broken, when its heartbeat is older than `stale_after_s`, or when
its holder ran on this host and its pid is gone. A lock left by an earlier run of this very
SLURM job (same job id, and for an array the same task) is this run's own: SLURM runs a job id
once at a time, so a job requeued after a node failure or a preemption, on another node, takes
over what its killed run left behind instead of waiting for it to go stale. Heartbeats compare wall clocks of different
hosts, so `stale_after_s` must exceed their skew by far (minutes, not seconds). A holder that
keeps a lock longer than that runs a heartbeat thread (`heartbeat_s`).

Breaking is safe against another breaker: the stale file is renamed to a name of the
breaker's own, and only if the renamed file is the stale one (its token) is it deleted;
otherwise it was a fresh lock taken in between, and it is put back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from dpr_hpc.errors import DprHpcError

log = logging.getLogger(__name__)
# For locks held longer than a few seconds: a beat every 30 s against the default stale bound
# of 300 s leaves nine beats lost to a slow filesystem before the lock reads stale.
HEARTBEAT_S = 30.0


# A lock whose holder set no other bound (the local submit's, the ledger's) is stale after this.
DEFAULT_STALE_AFTER_S = 300.0


class LockHeldError(DprHpcError):
    """The lock stayed held by someone else until the timeout; says who."""

    def __init__(self, path: Path, purpose: str, holder: dict | None, waited_s: float) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"{path}: cannot take the lock for {purpose} after {waited_s:.0f}s: {describe_holder(holder)}")


class LockFile:
    def __init__(
        self, path: Path, *, purpose: str, stale_after_s: float = DEFAULT_STALE_AFTER_S,
        heartbeat_s: float | None = None, timeout_s: float = 0.0,
    ) -> None:
        """`timeout_s` is what `with LockFile(...)` waits; `acquire` takes its own."""
        if heartbeat_s is not None and heartbeat_s >= stale_after_s:
            raise ValueError("heartbeat_s must be shorter than stale_after_s, or the lock reads stale while held")
        self.path = Path(path)
        self.purpose = purpose
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._created = 0.0
        self._stop_heartbeat = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self, timeout_s: float = 0.0, poll_s: float = 0.2) -> "LockFile":
        """Take the lock, breaking a stale one; wait up to `timeout_s` (may be math.inf) for a
        live holder, then raise LockHeldError naming it."""
        if self.held:
            raise RuntimeError(f"{self.path}: this LockFile already holds the lock")
        started = time.monotonic()
        while True:
            if self._try_create():
                self._start_heartbeat()
                return self
            holder = self.read_holder(self.path)
            if holder is None and not self.path.exists():
                continue  # released between the two calls: try again at once
            if self._is_stale(holder):
                self._break(holder)
                continue
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise LockHeldError(self.path, self.purpose, holder, waited)
            time.sleep(poll_s if math.isinf(timeout_s) else min(poll_s, max(0.0, timeout_s - waited)))

    def release(self) -> None:
        """Remove the lock file, but only if it is still ours (a lock broken as stale and taken
        by someone else is theirs now)."""
        self._stop_heartbeat.set()
        if self._heartbeat_thread is not None and self._heartbeat_thread is not threading.current_thread():
            self._heartbeat_thread.join()
        self._heartbeat_thread = None
        token, self._token = self._token, None
        if token is None:
            return
        holder = self.read_holder(self.path)
        if holder is not None and holder.get("token") == token:
            self.path.unlink(missing_ok=True)
        else:
            log.warning("%s: the lock for %s was no longer ours when released (%s)", self.path, self.purpose, describe_holder(holder))

    def refresh(self) -> None:
        """Rewrite the heartbeat now. The file is rewritten in place, in the inode whose token
        was checked, so a lock someone else took meanwhile is never overwritten."""
        if self._token is None:
            raise RuntimeError(f"{self.path}: refresh of a lock not held")
        try:
            with self.path.open("r+") as handle:
                holder = _parse(handle.read())
                if holder is None or holder.get("token") != self._token:
                    raise LockHeldError(self.path, self.purpose, holder, 0.0)
                handle.seek(0)
                handle.write(self._content(time.time()))
                handle.truncate()
                handle.flush()
                os.fsync(handle.fileno())
        except FileNotFoundError:
            raise LockHeldError(self.path, self.purpose, None, 0.0) from None

    def __enter__(self) -> "LockFile":
        return self.acquire(self.timeout_s)

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    @staticmethod
    def read_holder(path: Path) -> dict | None:
        """The holder a lock file records; None when there is no lock or its content is not
        readable yet (a holder between creating and writing it)."""
        try:
            return _parse(Path(path).read_text())
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
            return None

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        self._token = uuid.uuid4().hex
        self._created = time.time()
        with os.fdopen(fd, "w") as handle:
            handle.write(self._content(self._created))
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _content(self, heartbeat: float) -> str:
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), **slurm_identity(),
            "purpose": self.purpose, "created": self._created, "heartbeat": heartbeat, "token": self._token,
        }) + "\n"

    def _is_stale(self, holder: dict | None) -> bool:
        if holder is None:
            # Unreadable: a holder between creating and writing the file, unless that was long ago.
            try:
                return time.time() - self.path.stat().st_mtime > self.stale_after_s
            except FileNotFoundError:
                return False  # released meanwhile: the next round takes it
        if earlier_run_of_this_job(holder):
            log.warning("%s: taking over the lock left by an earlier run of this SLURM job (%s)", self.path, describe_holder(holder))
            return True
        return holder_is_stale(holder, self.stale_after_s)

    def _break(self, stale: dict | None) -> None:
        """Remove the stale lock `stale` unless someone else already did and took a new one."""
        aside = self.path.with_name(f"{self.path.name}.breaking.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another breaker was first
        moved = self.read_holder(aside)
        if (moved or {}).get("token") == (stale or {}).get("token"):
            log.warning("%s: broke a stale lock (%s)", self.path, describe_holder(moved))
            aside.unlink(missing_ok=True)
            return
        # A fresh lock taken after the stale one was broken by someone else: put it back.
        try:
            os.link(aside, self.path)
        except FileExistsError:
            log.warning("%s: a lock moved aside while breaking could not be put back (%s)", self.path, describe_holder(moved))
        aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        if self.heartbeat_s is None:
            return
        self._stop_heartbeat = threading.Event()
        self._heartbeat_thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._heartbeat_thread.start()

    def _beat(self) -> None:
        assert self.heartbeat_s is not None
        while not self._stop_heartbeat.wait(self.heartbeat_s):
            try:
                self.refresh()
            except (LockHeldError, RuntimeError) as exc:
                log.warning("%s: heartbeat stopped: %s", self.path, exc)
                return
            except OSError as exc:  # a filesystem hiccup: the next beat tries again
                log.warning("%s: heartbeat not written: %s", self.path, exc)


def describe_holder(holder: dict | None) -> str:
    """'held by pid 4242 on node17 (SLURM job 991), for submit, heartbeat 12s ago'."""
    if holder is None:
        return "held by a holder whose lock file is not readable (being written, or not a dpr-hpc lock)"
    job = holder.get("slurm_job_id")
    slurm = f" (SLURM job {job})" if job else " (no SLURM job)"
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"held by pid {holder.get('pid')} on {holder.get('host')}{slurm}, for {holder.get('purpose')}, heartbeat {age:.0f}s ago"


def _parse(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and "token" in holder else None


def slurm_identity() -> dict[str, str | int | None]:
    """Which SLURM job, array task and run of it this process is (None outside SLURM). SLURM
    sets SLURM_RESTART_COUNT only once a job was requeued: absent, this is its first run."""
    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": _int_or_zero(os.environ.get("SLURM_RESTART_COUNT")),
    }


def earlier_run_of_this_job(holder: dict) -> bool:
    """Whether `holder` is an earlier run of the SLURM job this process runs in: the same job id
    (and array task), and another run of it (a lower restart count) or another node. SLURM never
    runs one job id twice at once, so such a holder was killed (node failure, preemption,
    `scontrol requeue`) however fresh its heartbeat looks; its lock is ours to take over."""
    ours = slurm_identity()
    if not ours["slurm_job_id"] or str(holder.get("slurm_job_id")) != ours["slurm_job_id"]:
        return False
    for key in ("slurm_array_job_id", "slurm_array_task_id"):
        if (str(holder[key]) if holder.get(key) is not None else None) != ours[key]:
            return False
    restart = _int_or_zero(holder.get("slurm_restart_count"))
    if restart != ours["slurm_restart_count"]:
        return restart < ours["slurm_restart_count"]
    return holder.get("host") != socket.gethostname()


def _int_or_zero(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def holder_is_stale(holder: dict, stale_after_s: float) -> bool:
    """A holder that stopped proving it is alive: no heartbeat for `stale_after_s`, or its
    process is gone from this host."""
    if time.time() - float(holder.get("heartbeat", 0)) > stale_after_s:
        return True
    return holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid"))


def pid_alive(pid: Any) -> bool:
    """Whether a process with this id runs on this host (a pid of another user's counts)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
