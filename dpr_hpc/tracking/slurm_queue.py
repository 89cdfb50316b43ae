"""What SLURM says about jobs: one batched sacct per call, squeue for what sacct lacks.

sacct needs accounting (slurmdbd); it also lags a just-submitted job. Where it fails, squeue
(which knows only pending and running jobs) stands in and the caller is told so; where neither
answers, the caller gets SchedulerUnreachableError, never an empty view (which would read as
every job gone). Where sacct answers but leaves jobs out and squeue then fails, those jobs are
unknown, never gone: a lagging sacct must not turn a pending job into a failed one. Both are asked about the ledger's users only, and sacct only from the ledger's
first submission on, so that a recycled job id cannot show someone else's or an older job.

A job array's task is known by `<array job id>_<index>` (as the ledger records it, and as squeue's
%i and sacct's JobID name it); squeue and sacct list a pending array's tasks that have not started
on one line, `123_[5-9%2]`, which reads here as one PENDING job per task.
"""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Iterable, Sequence

from dpr_hpc.errors import SchedulerError, SchedulerUnreachableError

if TYPE_CHECKING:
    from dpr_hpc.tracking.ledger import Ledger
    from dpr_hpc.planning.plan import StageJob

# The tag in a job's --comment that names the stage job it runs (Ledger.nonce).
TAG_PREFIX = "dpr-hpc:"
_TAGGED_COMMENT = re.compile(re.escape(TAG_PREFIX) + r"([0-9a-f]+)(?:,|$)")
# Every job state SLURM documents (sacct and squeue, long names) -> the status dpr-hpc shows.
# HELD: in the queue, not progressing by itself (stopped, suspended, held after a requeue or a
# deleted reservation): left alone by submit, never read as failed.
SLURM_STATES: dict[str, str] = {
    "PENDING": "PENDING",
    "CONFIGURING": "RUNNING",  # nodes allocated, booting
    "RUNNING": "RUNNING",
    "COMPLETING": "RUNNING",  # processes still ending; the record decides what it produced
    "SIGNALING": "RUNNING",
    "STAGE_OUT": "RUNNING",  # burst buffer staging out after the script ended
    "RESIZING": "RUNNING",
    "REVOKED": "RUNNING",  # federation: a sibling cluster runs it, so this copy was removed
    "REQUEUED": "REQUEUED",
    "REQUEUE_FED": "REQUEUED",
    "REQUEUE_HOLD": "HELD",
    "SPECIAL_EXIT": "HELD",  # requeued held, by an epilog's decision
    "RESV_DEL_HOLD": "HELD",
    "STOPPED": "HELD",  # SIGSTOP, allocation kept
    "SUSPENDED": "HELD",  # allocation released until resumed
    "COMPLETED": "COMPLETED",  # the scheduler's word only: status still asks for a valid record
    "FAILED": "FAILED",
    "BOOT_FAIL": "FAILED",
    "NODE_FAIL": "FAILED",
    "OUT_OF_MEMORY": "FAILED",
    "DEADLINE": "FAILED",
    "LAUNCH_FAILED": "FAILED",
    "TIMEOUT": "TIMEOUT",
    "CANCELLED": "CANCELLED",
    "PREEMPTED": "INTERRUPTED",  # ended by the scheduler, not by a fault of the job
}
ACTIVE_STATUSES = ("PENDING", "RUNNING", "REQUEUED", "HELD")
UNKNOWN_STATE_STATUS = "HELD"  # a state newer than this table: left alone rather than resubmitted
# sacct's -S: before the first submission by this much, for clocks that differ between hosts.
SINCE_MARGIN = timedelta(hours=1)


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str
    exit_code: str = ""
    node: str = ""
    elapsed: str = ""
    reason: str = ""

    @property
    def status(self) -> str:
        """The dpr-hpc status of this SLURM state (sacct's 'CANCELLED by 123' is CANCELLED)."""
        return SLURM_STATES.get(self.state, UNKNOWN_STATE_STATUS)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def waits_on_a_dead_dependency(self) -> bool:
        return self.state == "PENDING" and self.reason.startswith("DependencyNeverSatisfied")

    @property
    def never_started(self) -> bool:
        """Cancelled while pending (e.g. by kill-on-invalid-dep when its upstream job was
        cancelled): nothing of it failed, so submitting it again needs no --retry-failed."""
        return self.state.startswith("CANCELLED") and self.elapsed in ("", "00:00:00", "0:00")


@dataclass(frozen=True)
class SchedulerView:
    jobs: dict[str, JobInfo]
    source: str  # "sacct", "squeue (accounting unavailable: …)"
    unknown: frozenset[str] = frozenset()  # ids sacct did not list, squeue not asked successfully


@dataclass(frozen=True)
class Standing:
    """What the scheduler says of a stage job's latest submission: the one reading of a view
    that status, submit (either backend), cancel and logs -f share."""

    job_id: str
    info: JobInfo | None  # its line in sacct or squeue; None when neither listed it
    unknown: bool = False  # sacct did not list it and squeue did not answer: neither queued nor gone
    recent: bool = False  # submitted less than the ledger's grace period ago: sacct may not list it yet

    @property
    def may_still_run(self) -> bool:
        """Queued or running as far as anyone can tell: listed as active, or not listed but just
        submitted, or not knowable now. Such a job is never submitted again, nor run elsewhere."""
        return self.info.active if self.info is not None else self.recent or self.unknown

    def describe(self) -> str:
        if self.info is not None:
            return f"{self.info.state.lower()} on SLURM as job {self.job_id}"
        if self.unknown:
            return f"SLURM job {self.job_id}'s state is unknown (sacct has not listed it and squeue did not answer)"
        if self.recent:
            return f"submitted to SLURM as job {self.job_id}; not yet listed by the scheduler"
        return f"SLURM job {self.job_id} is no longer listed by the scheduler"


@dataclass(frozen=True)
class StageJobsView:
    standings: dict["StageJob", Standing]  # the stage jobs the ledger has a submission of
    source: str


def ask_about(ledger: "Ledger", jobs: Iterable["StageJob"]) -> StageJobsView:
    """What the scheduler says of these stage jobs' latest submissions in the ledger, one query
    for all. Raises SchedulerUnreachableError when neither sacct nor squeue answers."""
    latest = {job: entry for job in jobs if (entry := ledger.latest(job))}
    view = query(sorted({entry["job_id"] for entry in latest.values()}), ledger.first_submission(), ledger.users())
    return StageJobsView({
        job: Standing(entry["job_id"], view.jobs.get(entry["job_id"]), entry["job_id"] in view.unknown, ledger.recently_submitted(job))
        for job, entry in latest.items()
    }, view.source)


_ARRAY_RANGE = re.compile(r"(\d+)_\[([\d,-]+)(?:%\d+)?\]")


def array_job_id(job_id: str) -> str:
    """The job id SLURM knows an array by ('123' for '123_4' and '123_[5-9%2]'); a plain job's own id."""
    return job_id.split("_", 1)[0]


def listed_ids(job_id: str) -> list[str]:
    """The job ids one squeue %i or sacct JobID stands for: itself, or each task of a pending
    range ('123_[5-7,9%2]' -> 123_5, 123_6, 123_7, 123_9). An id it cannot read is kept as it is."""
    match = _ARRAY_RANGE.fullmatch(job_id.strip())
    if not match:
        return [job_id.strip()]
    array, tasks = match.groups()
    ids = []
    for part in tasks.split(","):
        first, _, last = part.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            ids += [f"{array}_{index}" for index in range(int(first), int(last or first) + 1)]
    return ids


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def query(job_ids: list[str], since: datetime | None = None, users: Sequence[str] = ()) -> SchedulerView:
    """States of `job_ids` submitted by `users` (default: this user) from `since` on.
    Raises SchedulerUnreachableError when neither sacct nor squeue answers."""
    if not job_ids:
        return SchedulerView({}, "none")
    users = list(users) or [getpass.getuser()]
    sacct_error: SchedulerError | None = None
    try:
        jobs = _sacct(job_ids, since, users)
        source = "sacct"
    except SchedulerError as exc:
        sacct_error, jobs, source = exc, {}, f"squeue (sacct unavailable: {exc})"
    missing = [j for j in job_ids if j not in jobs]
    if missing:
        try:
            queued = _squeue(users)
        except SchedulerError as exc:
            if sacct_error is not None:
                raise SchedulerUnreachableError(f"sacct: {sacct_error}; squeue: {exc}") from None
            return SchedulerView(jobs, f"sacct, {len(missing)} job(s) unknown (not in sacct yet; squeue: {exc})", frozenset(missing))
        jobs.update({j: queued[j] for j in missing if j in queued})
    return SchedulerView(jobs, source)


ACCOUNTING_FIELDS = ("JobIDRaw", "State", "Submit", "Start", "End", "Elapsed", "TotalCPU", "MaxRSS", "ReqMem", "AllocTRES", "NodeList", "JobID")


@dataclass(frozen=True)
class JobAccounting:
    """What sacct measured of one job: its times (ISO, local time as sacct prints them), elapsed
    and total CPU seconds, the largest MaxRSS of its steps, and what it was allocated."""

    job_id: str
    state: str
    submit: str
    start: str
    end: str
    elapsed_s: float | None
    total_cpu_s: float | None
    max_rss_mb: float | None
    req_mem: str
    alloc_tres: dict[str, str]
    node_list: str

    @property
    def queue_wait_s(self) -> float | None:
        """Start - submit; None when either is unknown (a job that never started)."""
        try:
            return (datetime.fromisoformat(self.start) - datetime.fromisoformat(self.submit)).total_seconds()
        except ValueError:
            return None

    @property
    def gpus(self) -> int:
        return int(self.alloc_tres.get("gres/gpu", 0) or 0)

    @property
    def cpus(self) -> int:
        return int(self.alloc_tres.get("cpu", 0) or 0)

    @property
    def alloc_mem_mb(self) -> float | None:
        return memory_mb(self.alloc_tres["mem"]) if "mem" in self.alloc_tres else None


def accounting(job_ids: list[str], since: datetime | None = None, users: Sequence[str] = ()) -> dict[str, JobAccounting]:
    """sacct's measurements of these jobs, in one batched call: the allocation's line gives the
    times and the allocation, its steps' lines the peak RSS (sacct keeps MaxRSS per step only).
    `since` and `users` as for query(). Raises SchedulerError when sacct does not answer."""
    if not job_ids:
        return {}
    command = ["sacct", "-n", "-P", "-j", ",".join(dict.fromkeys(array_job_id(j) for j in job_ids)), "-o", ",".join(ACCOUNTING_FIELDS)]
    if users:
        command[1:1] = ["-u", ",".join(users)]
    if since is not None:
        # sacct reads times in the cluster's local time zone.
        command[1:1] = ["-S", (since - SINCE_MARGIN).astimezone().strftime("%Y-%m-%dT%H:%M:%S")]
    out = _run(command)
    allocations: dict[str, list[str]] = {}
    peak_rss: dict[str, float] = {}
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) < len(ACCOUNTING_FIELDS) - 1:
            continue
        shown = fields[11] if len(fields) > 11 and "_" in fields[11] else fields[0]  # an array task: 123_4, 123_4.batch
        job_id, _, step = shown.partition(".")
        if step:
            rss = memory_mb(fields[7])
            if rss is not None:
                peak_rss[job_id] = max(rss, peak_rss.get(job_id, 0.0))
        else:
            allocations[job_id] = fields
    return {
        job_id: JobAccounting(
            job_id=job_id, state=f[1].split()[0] if f[1] else "", submit=f[2], start=f[3], end=f[4],
            elapsed_s=duration_s(f[5]), total_cpu_s=duration_s(f[6]),
            max_rss_mb=max(filter(None, [memory_mb(f[7]), peak_rss.get(job_id)]), default=None),
            req_mem=f[8], alloc_tres=dict(item.split("=", 1) for item in f[9].split(",") if "=" in item), node_list=f[10],
        )
        for job_id, f in allocations.items()
    }


def duration_s(text: str) -> float | None:
    """SLURM's durations: [D-]HH:MM:SS[.fff] or MM:SS[.fff]; None when empty or unknown."""
    text = text.strip()
    if not text or text in ("INVALID", "UNLIMITED"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    hours, minutes, seconds = parts[-3:]
    return (int(days) if days else 0) * 86400 + hours * 3600 + minutes * 60 + seconds


_MEMORY_UNITS = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}


def memory_mb(text: str) -> float | None:
    """sacct's memory figures (`12444K`, `2G`, `2000Mn`, `4Gc`) in MiB; None when empty."""
    match = re.fullmatch(r"([\d.]+)([KMGT]?)[nc]?", text.strip())
    if not match:
        return None
    number, unit = float(match.group(1)), match.group(2)
    return number * _MEMORY_UNITS[unit] if unit else number / 2**20  # no unit: bytes


def queued_by_tag() -> dict[str, str]:
    """This user's queued and running jobs by the dpr-hpc tag in their comment: how a submit
    finds a job (or job array, by its array id) it queued but could not record (killed between
    sbatch and the ledger)."""
    try:
        out = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%k"])
    except SchedulerError as exc:
        raise SchedulerUnreachableError(f"squeue: {exc}") from None
    tagged = {}
    for line in out.splitlines():
        job_id, _, comment = line.partition("|")
        nonce = comment_nonce(comment)
        if nonce is not None:  # an array's tasks carry its one tag: the array's id
            tagged[nonce] = array_job_id(job_id.strip())
    return tagged


def job_comment(nonce: str, user_comment: str | None) -> str:
    """A job's --comment: the tag first (what queued_by_tag reads), then the profile's own
    comment after a comma, so a user's comment never hides the tag."""
    return f"{TAG_PREFIX}{nonce}" + (f",{user_comment}" if user_comment else "")


def comment_nonce(comment: str) -> str | None:
    """The nonce of a job_comment, or None for a job dpr-hpc did not tag."""
    match = _TAGGED_COMMENT.match(comment.strip())
    return match.group(1) if match else None


def submit_capacity() -> int | None:
    """How many more jobs this user may queue: the association's MaxSubmitJobs, or the
    cluster's MaxJobCount, less what the user has queued now; None where no limit can be read."""
    user = getpass.getuser()
    limits = []
    try:
        out = _run(["sacctmgr", "-n", "-P", "show", "assoc", f"where user={user}", "format=MaxSubmit"])
        limits += [int(v) for v in out.split() if v.strip().isdigit()]
    except SchedulerError:
        pass
    try:
        found = re.search(r"^MaxJobCount\s*=\s*(\d+)", _run(["scontrol", "show", "config"]), re.MULTILINE)
        if found:
            limits.append(int(found.group(1)))
    except SchedulerError:
        pass
    if not limits:
        return None
    try:
        queued = len(_run(["squeue", "-h", "-u", user, "-o", "%i"]).split())
    except SchedulerError:
        queued = 0
    return max(0, min(limits) - queued)


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])


def _sacct(job_ids: list[str], since: datetime | None, users: list[str]) -> dict[str, JobInfo]:
    """sacct -X: one line per job, per started array task, and per array's pending tasks (its
    own line, `123_[5-9%2]`). An array is asked for by its array id, which lists all of those
    (a task's own id would miss it while it is still in the pending range); JobIDRaw is no key for
    a task (the array's last task takes the array's raw id), so array lines go by JobID."""
    asked = ",".join(dict.fromkeys(array_job_id(j) for j in job_ids))
    command = ["sacct", "-X", "-n", "-P", "-u", ",".join(users), "-j", asked, "-o", "JobIDRaw,State,ExitCode,NodeList,Elapsed,Reason,JobID"]
    if since is not None:
        # sacct reads times in the cluster's local time zone.
        command[1:1] = ["-S", (since - SINCE_MARGIN).astimezone().strftime("%Y-%m-%dT%H:%M:%S")]
    out = _run(command)
    jobs = {}
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) < 6:
            continue
        raw, state, exit_code, node, elapsed, reason = fields[:6]
        shown = fields[6] if len(fields) > 6 and "_" in fields[6] else raw
        for job_id in listed_ids(shown):
            jobs[job_id] = JobInfo(job_id, state.split()[0], exit_code, "" if node == "None assigned" else node, elapsed, "" if reason == "None" else reason)
    return jobs


def _squeue(users: list[str]) -> dict[str, JobInfo]:
    """Every queued or running job of `users`: asked without -j, which fails for a list of ids
    squeue has forgotten, so that a failure here means squeue did not answer."""
    out = _run(["squeue", "-h", "-u", ",".join(users), "-t", "all", "-o", "%i|%T|%N|%M|%r"])
    jobs = {}
    for line in out.splitlines():
        shown, state, node, elapsed, reason = (line.split("|") + [""] * 5)[:5]
        for job_id in listed_ids(shown):
            jobs[job_id] = JobInfo(job_id, state, "", node, elapsed, "" if reason == "None" else reason)
    return jobs


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SchedulerError(f"{command[0]}: {exc}") from None
    if done.returncode != 0:
        raise SchedulerError((done.stderr or done.stdout).strip().splitlines()[-1] if (done.stderr or done.stdout).strip() else f"{command[0]} exited {done.returncode}")
    return done.stdout

