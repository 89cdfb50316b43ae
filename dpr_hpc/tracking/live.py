"""What the scheduler says now about a set of stage jobs: the one place that takes each job's
SLURM job id from the ledger (or from its record) and asks SLURM about all of them at once.

`status`, both backends' `submit`, `cancel`, `logs -f` and the cost table used to ask this each
their own way. The policy, written once here:
- A job with no submission in the ledger is not asked about: the store alone speaks for it.
- A partial answer (sacct has not listed a job yet and squeue does not answer) leaves that job
  *unknown*, never gone (slurm_queue.ask_about): it may still run, so nothing resubmits it.
- No SLURM commands on this host, or neither sacct nor squeue answering, is not an empty
  answer: the view says so (`unanswered`) and holds no standing, so no job reads as ended.
  A caller that would act on the answer (submit) calls `require()`, which raises; one that
  only shows it (status) shows every submitted job as UNKNOWN with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from dpr_hpc.tracking import slurm_queue
from dpr_hpc.tracking.slurm_queue import JobAccounting, Standing
from dpr_hpc.errors import SchedulerError, SchedulerUnreachableError

if TYPE_CHECKING:
    from dpr_hpc.planning.plan import StageJob
    from dpr_hpc.store.records import Records
    from dpr_hpc.tracking.ledger import Ledger

NO_SLURM_HERE = "SLURM jobs in the ledger, but no SLURM commands here"


@dataclass(frozen=True)
class LiveView:
    """The scheduler's word on the stage jobs asked about that the ledger has a submission of."""

    job_ids: dict["StageJob", str]  # each job's latest SLURM job id in the ledger
    standings: dict["StageJob", Standing] = field(default_factory=dict)  # empty when unanswered
    source: str = "none"  # which command answered: "sacct", "squeue (sacct unavailable: ...)"
    unanswered: str = ""  # why the scheduler was not asked or did not answer; "" when it answered
    unreachable: SchedulerUnreachableError | None = None  # the error, where it was asked and failed

    @property
    def no_slurm_here(self) -> bool:
        return self.unanswered == NO_SLURM_HERE

    def standing(self, job: "StageJob") -> Standing | None:
        return self.standings.get(job)

    def may_still_run(self) -> dict["StageJob", Standing]:
        """The jobs queued or running as far as anyone can tell (Standing.may_still_run)."""
        return {job: standing for job, standing in self.standings.items() if standing.may_still_run}

    def require(self) -> "LiveView":
        """This view, where the scheduler answered for every submitted job; else the reason, raised."""
        if self.unreachable is not None:
            raise self.unreachable
        if self.unanswered:
            raise SchedulerUnreachableError(self.unanswered)
        return self


def ask(ledger: "Ledger", jobs: Iterable["StageJob"]) -> LiveView:
    """What SLURM says of these jobs' latest submissions in the ledger: one query for all of
    them, never raising for a scheduler that is absent or does not answer (see `LiveView`)."""
    jobs = list(jobs)
    ids = {job: entry["job_id"] for job in jobs if (entry := ledger.latest(job)) and entry.get("backend", "slurm") == "slurm"}
    if not ids:
        return LiveView({})
    if not slurm_queue.slurm_available():
        return LiveView(ids, unanswered=NO_SLURM_HERE)
    try:
        view = slurm_queue.ask_about(ledger, ids)
    except SchedulerUnreachableError as unreachable:
        return LiveView(ids, unanswered=str(unreachable), unreachable=unreachable)
    return LiveView(ids, view.standings, view.source)


@dataclass(frozen=True)
class Accounting:
    """What sacct measured of the jobs that ran on SLURM, and how it was read (or why not)."""

    job_ids: dict["StageJob", str | None]  # the SLURM job that made the record, else the ledger's latest
    measured: dict[str, JobAccounting]  # by SLURM job id: those sacct listed
    note: str

    def of(self, job: "StageJob") -> JobAccounting | None:
        return self.measured.get(self.job_ids.get(job) or "")


def accounting(ledger: "Ledger", records: "Records", jobs: Iterable["StageJob"]) -> Accounting:
    """sacct's figures for these jobs, one call for all; an unanswered sacct leaves the records
    to give every figure (the note says so), since a cost table is read, not acted on."""
    ids = {job: _slurm_job_id(records.check(job).record, ledger.latest(job)) for job in jobs}
    asked = [i for i in ids.values() if i]
    if not asked:
        return Accounting(ids, {}, "no SLURM job: every figure from the records")
    try:
        found = slurm_queue.accounting(asked, ledger.first_submission(), ledger.users())
    except SchedulerError as exc:
        return Accounting(ids, {}, f"sacct did not answer ({exc}): every figure from the records")
    return Accounting(ids, found, f"sacct: {len(found)} of {len(asked)} SLURM jobs, in one call")


def _slurm_job_id(record: dict[str, Any] | None, submitted: dict[str, Any] | None) -> str | None:
    """The job that wrote the record knows its own id; a job without one, the ledger's latest."""
    if record and record.get("node", {}).get("slurm_job_id"):
        return str(record["node"]["slurm_job_id"])
    if submitted and submitted.get("backend", "slurm") == "slurm":
        return str(submitted["job_id"])
    return None
