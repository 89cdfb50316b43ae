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
