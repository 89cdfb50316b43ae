"""SLURM backend: every pending stage job goes to sbatch through submitit's SlurmExecutor, with
`--dependency=afterok:` on the jobs whose outputs it reads, and `submit` returns at once.

Repeats are separate jobs, so they can land on different nodes. Each submission is recorded in
the ledger before the next one is made; a second submit (even a concurrent one) sees it there.
Each sbatch carries a tag (`--comment=dpr-hpc:<nonce>`, Ledger.nonce): a job queued by a submit
that died before recording it, or by an sbatch that timed out after queueing, is found by its
tag and adopted, never queued twice. If the scheduler cannot be asked, nothing is submitted.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import submitit
from submitit.core import utils as submitit_utils
from submitit.slurm.slurm import _make_sbatch_string

from dpr_hpc.tracking import slurm_queue
from dpr_hpc.backends.profile import StageResources
from dpr_hpc.backends.submit_report import SubmitReport, check_records, rerun_reasons
from dpr_hpc.errors import SubmissionError, UsageError
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.tracking.ledger import Ledger
from dpr_hpc.tracking.live import LiveView, ask
from dpr_hpc.inputs.hub import job_environment_lines
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.store.records import RecordCheck, Records
from dpr_hpc.store.runs import cell_history, resumable, save_plan
from dpr_hpc.stages.runner import stage_job_entry

SUBMIT_ATTEMPTS = 4
BACKOFF_S = 2.0


class SlurmBackend:
    name = "slurm"

    def __init__(
        self,
        layout: RunLayout,
        plan: Plan,
        resources: dict[str, StageResources],
        echo: Callable[[str], None] = print,
        *,
        hold: bool = False,
        retry_failed: bool = False,
        only: frozenset[StageJob] | None = None,
    ) -> None:
        """`only`: the jobs a selection (--cell, --group, --stage) submits; every job by default."""
        if any(c.isspace() or not c.isprintable() for c in str(layout.root)):
            # The run folder is written into #SBATCH --output/--error lines, which end at a space.
            raise UsageError(f"{layout.root}: the run folder's path must not contain spaces or control characters for SLURM")
        self.layout = layout
        self.plan = plan
        self.resources = resources
        self.echo = echo
        self.hold = hold
        self.retry_failed = retry_failed
        self.only = only
        self.capacity: int | None = None
        self._checks: dict[StageJob, RecordCheck] = {}  # read once per submit: dependants ask again
        self._reasons: dict[StageJob, str] = {}
        self._sbatch_count = 0
        self._environment = job_environment_lines()  # the same for every job of this submit

    def submit(self, grid_file: Path) -> SubmitReport:
        report = SubmitReport()
        store = self.layout.store
        records = Records(store, plan=self.plan)
        self._checks = check_records(self.plan, records)
        self._reasons = rerun_reasons(self.plan, self._checks, cell_history(self.layout), records)
        with Ledger.locked(store) as ledger:
            jobs = [job for job in self._jobs() if not self._complete(job)]
            self._adopt_tagged(jobs, ledger, slurm_queue.queued_by_tag())
            view = ask(ledger, jobs).require()
            save_plan(self.layout, self.plan, grid_file)
            self.capacity = slurm_queue.submit_capacity()
            queued: dict[StageJob, str] = {}
            for job in self._jobs():
                self._place(job, ledger, view, queued, report)
        self.echo(f"slurm: {report.summary('submitted')}")
        return report

    def _place(self, job: StageJob, ledger: Ledger, view: LiveView, queued: dict[StageJob, str], report: SubmitReport) -> None:
        if self._complete(job):
            report.skipped.append(job)
            return
        latest = ledger.latest(job)
        if latest:
            standing = view.standings[job]
            info = standing.info
            orphaned = info is not None and info.state == "PENDING" and (
                info.waits_on_a_dead_dependency or any(dep in report.ran for dep in self.plan.dependencies(job))
            )
            if orphaned:  # waits on a job that ended without a result (now resubmitted): it can never run
                slurm_queue.cancel([latest["job_id"]])
                self.echo(f"{job.id}: job {latest['job_id']} waited on an upstream job that ended; submitting it again")
            elif standing.may_still_run:
                if standing.unknown:
                    self.echo(f"{job.id}: left alone: {standing.describe()}")
                queued[job] = latest["job_id"]
                report.active.append(job)
                return
            if job in self._reasons:
                self.echo(f"{job.id}: {self._reasons[job]}")
            elif resumable(self.layout.store.job(job)):
                self.echo(f"{job.id}: job {latest['job_id']} stopped after a checkpoint; resuming it")
            elif orphaned or (info is not None and info.never_started):
                pass  # cancelled before it ran: submitted again like a new job
            elif not self.retry_failed:
                upstream_done = all(self._complete(dep) for dep in self.plan.dependencies(job))
                (report.failed if upstream_done else report.blocked).append(job)
                if upstream_done:
                    ended = info.state if info else "(no longer listed by the scheduler)"
                    self.echo(f"{job.id}: job {latest['job_id']} ended {ended} without a result; --retry-failed resubmits it")
                return
        dependencies = []
        for dep in self.plan.dependencies(job):
            if self._complete(dep):
                continue
            if dep not in queued:
                (report.deferred if dep in report.deferred else report.blocked).append(job)
                return
            dependencies.append(queued[dep])
        if self.capacity is not None and len(report.ran) >= self.capacity:
            report.deferred.append(job)
            return
        job_id = self._sbatch(job, dependencies, ledger.nonce(job))
        ledger.record(job, job_id, tag=ledger.nonce(job))
        queued[job] = job_id
        report.ran.append(job)
        after = f" after {','.join(dependencies)}" if dependencies else ""
        self.echo(f"{job.id}: submitted as job {job_id}{after}")

    def _jobs(self) -> list[StageJob]:
        return [job for job in self.plan.jobs() if self.only is None or job in self.only]

    def _complete(self, job: StageJob) -> bool:
        check = self._checks.get(job)
        return check is not None and check.complete

    def _adopt_tagged(self, jobs: list[StageJob], ledger: Ledger, tagged: dict[str, str]) -> None:
        """Record the queued jobs that carry a tag this ledger has not recorded yet."""
        for job in jobs:
            job_id = tagged.get(ledger.nonce(job))
            if job_id is not None:
                self.echo(f"{job.id}: adopting SLURM job {job_id}, queued by an earlier submit that did not record it")
                ledger.record(job, job_id, tag=ledger.nonce(job), adopted=True)

    def _sbatch(self, job: StageJob, dependencies: list[str], nonce: str) -> str:
        executor = submitit.SlurmExecutor(folder=self.layout.store.job(job).jobs, max_num_timeout=self.resources[job.stage].max_requeues)
        executor.update_parameters(**self.sbatch_parameters(job, dependencies, nonce))
        error: Exception | None = None
        for attempt in range(SUBMIT_ATTEMPTS):
            if attempt:  # the failed sbatch may have queued the job after all: look for its tag first
                queued = slurm_queue.queued_by_tag().get(nonce)
                if queued is not None:
                    self.echo(f"{job.id}: sbatch reported a failure but queued job {queued}; adopting it")
                    return queued
            try:
                job_id = executor.submit(stage_job_entry, str(self.layout.runs_root), job.stage, job.key, job.repeat).job_id
                self._sbatch_count += 1
                if _fault_after_sbatch(self._sbatch_count):
                    os._exit(137)  # fault injection: a submit killed between sbatch and the ledger write
                return job_id
            except (submitit_utils.FailedJobError, submitit_utils.FailedSubmissionError, OSError) as exc:
                error = exc
                if attempt + 1 < SUBMIT_ATTEMPTS:
                    time.sleep(BACKOFF_S * 2**attempt)
        message = str(error).strip().splitlines()[-1] if error and str(error).strip() else repr(error)
        raise SubmissionError(f"sbatch failed {SUBMIT_ATTEMPTS} times for {job.id} (cell {self.plan.users(job)[0]}): {message} (earlier submissions are in the ledger)")

    def sbatch_parameters(self, job: StageJob, dependencies: list[str], nonce: str = "<tag>") -> dict:
        r = self.resources[job.stage]
        params: dict = {
            "job_name": f"dpr-{job.stage}-r{job.repeat}-{self.plan.users(job)[0]}",
            "comment": slurm_queue.job_comment(nonce, r.comment),
            "time": r.time_min,
            "cpus_per_task": r.cpus_per_task,
            # The job acts on the warning this long before its end, however early SLURM sends it.
            "setup": list(r.setup) + [f"export DPR_HPC_SIGNAL_DELAY_S={r.signal_delay_s}"] + self._environment,
            "signal_delay_s": r.signal_delay_s,
        }
        optional = {"partition": r.partition, "gres": r.gres, "account": r.account, "qos": r.qos,
                    "mem": r.sbatch_mem, "constraint": r.constraint, "exclude": r.exclude, "nodelist": r.nodelist,
                    "exclusive": r.exclusive or None, "mail_type": r.mail_type, "mail_user": r.mail_user,
                    "dependency": "afterok:" + ":".join(dependencies) if dependencies else None}
        params.update({k: v for k, v in optional.items() if v is not None})
        # SLURM cancels a job whose dependency failed, instead of leaving it pending forever.
        params["additional_parameters"] = {
            **dict(r.sbatch_extra), **({"reservation": r.reservation} if r.reservation else {}),
            "kill-on-invalid-dep": "yes", **({"hold": True} if self.hold else {}),
        }
        return params

    def dry_run(self, forced: frozenset[StageJob] = frozenset()) -> list[tuple[StageJob, str]]:
        """The exact sbatch scripts submit would write, with the dependency on every upstream job
        named by its stage (a real submit fills in the SLURM job id); `forced` jobs (--force)
        are shown although complete."""
        scripts = []
        records = Records(self.layout.store, plan=self.plan)
        self._checks = {job: RecordCheck("stale", "forced") if job in forced else records.check(job) for job in self.plan.jobs()}
        for job in self._jobs():
            if self._complete(job):
                continue
            deps = [f"<{dep.id}>" for dep in self.plan.dependencies(job) if not self._complete(dep)]
            folder = self.layout.store.job(job).jobs
            command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"  # as submitit writes it
            scripts.append((job, _make_sbatch_string(command=command, folder=folder, **self.sbatch_parameters(job, deps))))
        return scripts


def _fault_after_sbatch(count: int) -> bool:
    """DPR_HPC_FAULT=kill-after-sbatch:N: the test hook that kills a submit right after its Nth
    sbatch, before the ledger records it."""
    fault = os.environ.get("DPR_HPC_FAULT", "")
    return fault.startswith("kill-after-sbatch:") and count == int(fault.split(":", 1)[1])
