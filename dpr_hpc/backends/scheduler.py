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


def query(job_ids: list[str]) -> SchedulerView:
    if not job_ids:
        return SchedulerView({}, "none")
    try:
        jobs = _sacct(job_ids)
        source = "sacct"
    except SchedulerError as exc:
        jobs, source = {}, f"squeue (sacct unavailable: {exc})"
    missing = [j for j in job_ids if j not in jobs]
    if missing:
        jobs.update(_squeue(missing))
    return SchedulerView(jobs, source)


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


def _sacct(job_ids: list[str]) -> dict[str, JobInfo]:
    out = _run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobIDRaw,State,ExitCode,NodeList,Elapsed,Reason"])
    jobs = {}
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) < 6:
            continue
        job_id, state, exit_code, node, elapsed, reason = fields[:6]
        jobs[job_id] = JobInfo(job_id, state.split()[0], exit_code, "" if node == "None assigned" else node, elapsed, "" if reason == "None" else reason)
    return jobs


def _squeue(job_ids: list[str]) -> dict[str, JobInfo]:
    try:
        out = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%N|%M|%r"])
    except SchedulerError:
        return {}  # squeue rejects a list holding only ids it has forgotten
    jobs = {}
    for line in out.splitlines():
        job_id, state, node, elapsed, reason = (line.split("|") + [""] * 5)[:5]
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
