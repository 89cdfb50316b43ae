"""Locks that hold on the shared filesystems where run folders live.

flock (what `filelock` uses) is not one: on Lustre mounted `noflock` it raises, with
`localflock` (and on BeeGFS by default) it locks on one node only, so two login nodes could
submit the same grid. A lock here is a file created with O_CREAT|O_EXCL, which the file server
decides atomically on NFS (v3 on), Lustre, BeeGFS and GPFS alike. The file says who holds it:
host, pid, SLURM job id, purpose, when it was taken and when the holder last proved it was
alive (its heartbeat).

A lock is stale, and may be broken, when its holder stopped proving it is alive. A holder on
this host is judged at once: its pid is gone, or its heartbeat stamp is older than
`stale_after_s` (one host, one clock). A holder on another host is judged by watching: its
heartbeat (a counter with a stamp) must be seen to advance, and it is dead only once it has not
changed for `stale_after_s` measured on this contender's own monotonic clock. Stamps written
by another host are never compared with this host's clock, so a node whose clock runs ahead
(or behind) can neither keep a dead lock alive nor have a live one broken. The price: a
contender meeting a lock from another host watches it for up to a heartbeat before it knows
its holder is alive, and for `stale_after_s` before it may break it; so a holder that keeps a
lock longer than a few seconds runs a heartbeat thread (`heartbeat_s`).

A lock left by an earlier run of this very SLURM job (same job id, and for an array the same
task) is this run's own: SLURM runs a job id once at a time, so a job requeued after a node
failure or a preemption, on another node, takes over what its killed run left behind instead
of waiting for it to go stale.

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
from typing import Any, Callable

from dpr_hpc.errors import LockHeldError

log = logging.getLogger(__name__)
# For locks held longer than a few seconds: a beat every 30 s against the default stale bound
# of 300 s leaves nine beats lost to a slow filesystem before the lock reads stale.
HEARTBEAT_S = 30.0


# A lock whose holder set no other bound (the local submit's, the ledger's) is stale after this.
DEFAULT_STALE_AFTER_S = 300.0


class LockFile:
    def __init__(
        self, path: Path, *, purpose: str, stale_after_s: float = DEFAULT_STALE_AFTER_S,
        heartbeat_s: float | None = None, timeout_s: float = 0.0, holder_ended: Callable[[dict], bool] | None = None,
    ) -> None:
        """`timeout_s` is what `with LockFile(...)` waits; `acquire` takes its own. `holder_ended`,
        where given, says whether a holder's job is known to have ended (the scheduler lists its
        SLURM job as finished): such a holder is dead at once, on any host, instead of after
        `stale_after_s` of watching its heartbeat. It is asked once per holder."""
        if heartbeat_s is not None and heartbeat_s >= stale_after_s:
            raise ValueError("heartbeat_s must be shorter than stale_after_s, or the lock reads stale while held")
        self.path = Path(path)
        self.purpose = purpose
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.holder_ended = holder_ended
        self._ended_verdicts: dict[str, bool] = {}  # holder token -> holder_ended's answer
        self._token: str | None = None
        self._created = 0.0
        self._beats = 0
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
        watch = HeartbeatWatch(self.stale_after_s)
        while True:
            if self._try_create():
                self._start_heartbeat()
                return self
            holder = self.read_holder(self.path)
            if holder is None and not self.path.exists():
                continue  # released between the two calls: try again at once
            verdict = self._judge(holder, watch)
            if verdict == DEAD:
                self._break(holder)
                continue
            waited = time.monotonic() - started
            if waited >= timeout_s:
                if verdict == ALIVE:
                    raise LockHeldError(self.path, self.purpose, holder, waited, describe_holder(holder))
                if watch.note_undecided():  # a holder elsewhere not yet seen to beat: watch on
                    log.warning("%s: watching the heartbeat of the lock for %s (%s) for up to %gs before deciding it is dead",
                                self.path, self.purpose, describe_holder(holder), self.stale_after_s)
            time.sleep(poll_s if math.isinf(timeout_s) or waited >= timeout_s else min(poll_s, max(0.0, timeout_s - waited)))

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
                    raise LockHeldError(self.path, self.purpose, holder, 0.0, describe_holder(holder))
                self._beats += 1
                handle.seek(0)
                handle.write(self._content(time.time()))
                handle.truncate()
                handle.flush()
                os.fsync(handle.fileno())
        except FileNotFoundError:
            raise LockHeldError(self.path, self.purpose, None, 0.0, describe_holder(None)) from None

    def verify(self) -> None:
        """Raise LockHeldError, naming who holds it now, unless the lock file still carries this
        holder's token: a holder whose heartbeat lapsed (a filesystem that blocked its writes, a
        suspended job) may have been judged dead and its lock taken."""
        if self._token is None:
            raise RuntimeError(f"{self.path}: verify of a lock not held")
        holder = self.read_holder(self.path)
        if holder is None or holder.get("token") != self._token:
            raise LockHeldError(self.path, self.purpose, holder, 0.0, describe_holder(holder))

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
        self._beats = 0
        with os.fdopen(fd, "w") as handle:
            handle.write(self._content(self._created))
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _content(self, heartbeat: float) -> str:
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), **slurm_identity(),
            "purpose": self.purpose, "created": self._created, "heartbeat": heartbeat, "beat": self._beats, "token": self._token,
        }) + "\n"

    def _judge(self, holder: dict | None, watch: "HeartbeatWatch") -> str:
        if holder is None:
            # Unreadable: a holder between creating and writing the file (microseconds), unless
            # that was long ago: an empty file an older dpr-hpc's flock left behind.
            try:
                return DEAD if time.time() - self.path.stat().st_mtime > self.stale_after_s else ALIVE
            except FileNotFoundError:
                return UNDECIDED  # released meanwhile: the next round takes it
        if earlier_run_of_this_job(holder):
            log.warning("%s: taking over the lock left by an earlier run of this SLURM job (%s)", self.path, describe_holder(holder))
            return DEAD
        if self._holder_ended(holder):
            log.warning("%s: taking over the lock of a job the scheduler lists as ended (%s)", self.path, describe_holder(holder))
            return DEAD
        return watch.judge(holder)

    def _holder_ended(self, holder: dict) -> bool:
        if self.holder_ended is None:
            return False
        token = str(holder.get("token"))
        if token not in self._ended_verdicts:
            self._ended_verdicts[token] = bool(self.holder_ended(holder))
        return self._ended_verdicts[token]

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


ALIVE, DEAD, UNDECIDED = "alive", "dead", "undecided"


class HeartbeatWatch:
    """One contender's judgement of a lock's holder, over the polls of one `acquire`.

    A holder on this host is judged from one reading (its pid, and its stamp against the same
    host's clock). A holder elsewhere is ALIVE once its heartbeat was seen to change, and DEAD
    once it has not changed for `stale_after_s` on this process's monotonic clock; until then
    it is UNDECIDED. A new token is a new holder, watched from scratch.
    """

    def __init__(self, stale_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._seen: tuple[Any, ...] | None = None
        self._since = 0.0
        self._advanced = False
        self._noted = False

    def judge(self, holder: dict) -> str:
        if holder.get("host") == socket.gethostname():
            return DEAD if holder_is_stale(holder, self.stale_after_s) else ALIVE
        beat = (holder.get("token"), holder.get("beat"), holder.get("heartbeat"))
        now = self._clock()
        if self._seen is None or beat[0] != self._seen[0]:
            self._seen, self._since, self._advanced, self._noted = beat, now, False, False
            return UNDECIDED
        if beat != self._seen:
            self._seen, self._since, self._advanced = beat, now, True
            return ALIVE
        if now - self._since > self.stale_after_s:
            return DEAD
        return ALIVE if self._advanced else UNDECIDED

    def note_undecided(self) -> bool:
        """True the first time a caller waits on this holder only to judge it (to say so once)."""
        first, self._noted = not self._noted, True
        return first


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
    """From one reading: a holder whose heartbeat stamp is older than `stale_after_s` by this
    host's clock, or whose process is gone from this host. Exact for a holder on this host; for
    one elsewhere a guess that clock skew can mislead, good enough for what `status` shows, while
    taking a lock watches the heartbeat instead (HeartbeatWatch)."""
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
