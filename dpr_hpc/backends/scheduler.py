"""What SLURM says about jobs: one batched sacct per call, squeue for what sacct lacks.

sacct needs accounting (slurmdbd); it also lags a just-submitted job. Where it fails, squeue
(which knows only pending and running jobs) stands in and the caller is told so.
"""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime

from dpr_hpc.errors import DprHpcError

# The tag in a job's --comment that names the stage job it runs (Ledger.nonce).
TAG_PREFIX = "dpr-hpc:"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED"}


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str
    exit_code: str = ""
    node: str = ""
    elapsed: str = ""
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

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


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def query(job_ids: list[str], since: str | None = None) -> SchedulerView:
    """What SLURM says of these jobs. Raises SchedulerUnreachableError when neither sacct nor
    squeue answers: reading every job as gone would make submit queue running jobs again."""
    if not job_ids:
        return SchedulerView({}, "none")
    try:
        jobs = _sacct(job_ids, since)
        source = "sacct"
    except SchedulerError as exc:
        jobs, source = {}, f"squeue (sacct unavailable: {exc})"
        sacct_error = str(exc)
    else:
        sacct_error = ""
    missing = [j for j in job_ids if j not in jobs]
    if missing:
        try:
            jobs.update(_squeue(missing))
        except SchedulerError as exc:
            if sacct_error:
                raise SchedulerUnreachableError(f"scheduler unreachable: sacct: {sacct_error}; squeue: {exc}") from None
    return SchedulerView(jobs, source)


ACCOUNTING_FIELDS = ("JobIDRaw", "State", "Submit", "Start", "End", "Elapsed", "TotalCPU", "MaxRSS", "ReqMem", "AllocTRES", "NodeList")


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


def accounting(job_ids: list[str], since: str | None = None) -> dict[str, JobAccounting]:
    """sacct's measurements of these jobs, in one batched call: the allocation's line gives the
    times and the allocation, its steps' lines the peak RSS (sacct keeps MaxRSS per step only).
    Raises SchedulerError when sacct does not answer (no accounting, no SLURM)."""
    if not job_ids:
        return {}
    window = ["-S", _sacct_time(since)] if since else []
    out = _run(["sacct", "-n", "-P", *window, "-j", ",".join(job_ids), "-o", ",".join(ACCOUNTING_FIELDS)])
    allocations: dict[str, list[str]] = {}
    peak_rss: dict[str, float] = {}
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) < len(ACCOUNTING_FIELDS):
            continue
        job_id, _, step = fields[0].partition(".")
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
    finds a job it queued but could not record (killed between sbatch and the ledger)."""
    try:
        out = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%k"])
    except SchedulerError as exc:
        raise SchedulerUnreachableError(f"scheduler unreachable: squeue: {exc}") from None
    tagged = {}
    for line in out.splitlines():
        job_id, _, comment = line.partition("|")
        if comment.startswith(TAG_PREFIX):
            tagged[comment[len(TAG_PREFIX):].strip()] = job_id.strip()
    return tagged


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


class SchedulerError(RuntimeError):
    pass


class SchedulerUnreachableError(DprHpcError):
    """Neither sacct nor squeue answered: nothing can be known, so nothing is submitted."""

    exit_code = 1


def _sacct(job_ids: list[str], since: str | None = None) -> dict[str, JobInfo]:
    window = ["-S", _sacct_time(since)] if since else []
    out = _run(["sacct", "-X", "-n", "-P", *window, "-j", ",".join(job_ids), "-o", "JobIDRaw,State,ExitCode,NodeList,Elapsed,Reason"])
    jobs = {}
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) < 6:
            continue
        job_id, state, exit_code, node, elapsed, reason = fields[:6]
        jobs[job_id] = JobInfo(job_id, state.split()[0], exit_code, "" if node == "None assigned" else node, elapsed, "" if reason == "None" else reason)
    return jobs


def _squeue(job_ids: list[str]) -> dict[str, JobInfo]:
    """This user's jobs among `job_ids` that squeue still lists (it forgets ended ones)."""
    out = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T|%N|%M|%r"])
    wanted = set(job_ids)
    jobs = {}
    for line in out.splitlines():
        job_id, state, node, elapsed, reason = (line.split("|") + [""] * 5)[:5]
        if job_id not in wanted:
            continue
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


def _sacct_time(iso: str) -> str:
    """An ISO timestamp (UTC, as the ledger writes them) as sacct's local YYYY-MM-DDTHH:MM:SS."""
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%dT%H:%M:%S")
