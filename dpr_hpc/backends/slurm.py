"""SLURM backend: every pending stage job goes to sbatch through submitit's SlurmExecutor, with
`--dependency=afterok:` on the jobs whose outputs it reads, and `submit` returns at once.

Repeats are separate jobs, so they can land on different nodes. Each submission is recorded in
the ledger before the next one is made; a second submit (even a concurrent one) sees it there.
Each sbatch carries a tag (`--comment=dpr-hpc:<nonce>`, Ledger.nonce): a job queued by a submit
that died before recording it, or by an sbatch that timed out after queueing, is found by its
tag and adopted, never queued twice. If the scheduler cannot be asked, nothing is submitted.

The jobs of a plan.ArrayGroup (a corpus stage's shards) that still need to run go to SLURM as one
job array through submitit's executor.batch(): `--array=0-(n-1)%K`, task i running the i-th of
them, recorded in the ledger as `<array id>_<i>` so that status, cancel, logs and a later submit
treat each task as its own job. A task that fails or is preempted is submitted again alone (a
plain job) or with the others still needed (a new, smaller array). One of a kind: an array of
one is a plain job.
"""

from __future__ import annotations

import json
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
from dpr_hpc.fsutil import write_json_atomic
from dpr_hpc.planning.plan import ArrayGroup, Plan, StageJob
from dpr_hpc.store.records import RecordCheck, Records
from dpr_hpc.store.bindings import cell_history, save_plan
from dpr_hpc.store.markers import resumable
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
        self._arrays: dict[str, int] = {}  # array id -> how many tasks, of the arrays this submit queued
        self._environment = job_environment_lines()  # the same for every job of this submit

    def submit(self, grid_file: Path) -> SubmitReport:
        report = SubmitReport()
        store = self.layout.store
        records = Records(store, plan=self.plan)
        self._checks = check_records(self.plan, records)
        self._reasons = rerun_reasons(self.plan, self._checks, cell_history(self.layout), records)
        with Ledger.locked(store) as ledger:
            jobs = [job for job in self._jobs() if not self._complete(job)]
            tagged = slurm_queue.queued_by_tag()
            self._adopt_tagged(jobs, ledger, tagged)
            self._adopt_tagged_arrays(ledger, tagged)
            view = ask(ledger, jobs).require()
            save_plan(self.layout, self.plan, grid_file)
            self.capacity = slurm_queue.submit_capacity()
            queued: dict[StageJob, str] = {}
            groups = self._groups()
            for job in self._jobs():
                group = groups.get(job)
                if group is None:
                    self._place(job, ledger, view, queued, report)
                elif job == self._members(group)[0]:  # the whole array where its first task comes
                    self._place_array(group, ledger, view, queued, report)
        self.echo(f"slurm: {report.summary('submitted')}")
        return report

    def _place(self, job: StageJob, ledger: Ledger, view: LiveView, queued: dict[StageJob, str], report: SubmitReport) -> None:
        dependencies = self._ready(job, ledger, view, queued, report)
        if dependencies is not None:
            self._queue_one(job, dependencies, ledger, queued, report)

    def _queue_one(self, job: StageJob, dependencies: list[str], ledger: Ledger, queued: dict[StageJob, str], report: SubmitReport) -> None:
        """sbatch one job found ready (`_ready`, which is asked once: it cancels orphans and says
        why a job waits), unless the submit limit is reached."""
        if self.capacity is not None and len(report.ran) >= self.capacity:
            report.deferred.append(job)
            return
        job_id = self._sbatch(job, dependencies, ledger.nonce(job))
        ledger.record(job, job_id, tag=ledger.nonce(job))
        queued[job] = job_id
        report.ran.append(job)
        after = f" after {','.join(dependencies)}" if dependencies else ""
        self.echo(f"{job.id}: submitted as job {job_id}{after}")

    def _place_array(self, group: ArrayGroup, ledger: Ledger, view: LiveView, queued: dict[StageJob, str], report: SubmitReport) -> None:
        """The group's tasks that need to run, as one array after the union of their upstream
        jobs (a shard waits on its cell's training, afterok, as a plain job does)."""
        ready = {job: deps for job in self._members(group) if (deps := self._ready(job, ledger, view, queued, report)) is not None}
        room = len(ready) if self.capacity is None else max(0, self.capacity - len(report.ran))
        tasks = list(ready)[:room]  # SLURM counts each task against MaxSubmitJobs
        report.deferred.extend(list(ready)[room:])
        if len(tasks) <= 1:
            for job in tasks:
                self._queue_one(job, ready[job], ledger, queued, report)
            return
        dependencies = self._afterok([dep for job in tasks for dep in ready[job]])
        tag = ledger.array_tag(tasks)
        array_id = self._sbatch_array(group, tasks, dependencies, tag, [ledger.nonce(job) for job in tasks])
        for index, job in enumerate(tasks):
            ledger.record(job, f"{array_id}_{index}", tag=tag, array=array_id, task=index, group=group.name)
            queued[job] = f"{array_id}_{index}"
            report.ran.append(job)
        self._arrays[array_id] = len(tasks)
        after = f" after {','.join(dependencies)}" if dependencies else ""
        self.echo(f"{group.name}: submitted {len(tasks)} tasks as job array {array_id} "
                  f"(--array=0-{len(tasks) - 1}%{min(len(tasks), group.parallel)}){after}")

    def _ready(self, job: StageJob, ledger: Ledger, view: LiveView, queued: dict[StageJob, str], report: SubmitReport) -> list[str] | None:
        """The SLURM job ids `job` must wait on (afterok) when it is to be submitted now; None
        when it is not (complete, still queued, failed, or its upstream job is not queued), with
        the job put in the report's list that says why."""
        if self._complete(job):
            report.skipped.append(job)
            return None
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
                return None
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
                return None
        dependencies = []
        for dep in self.plan.dependencies(job):
            if self._complete(dep):
                continue
            if dep not in queued:
                (report.deferred if dep in report.deferred else report.blocked).append(job)
                return None
            dependencies.append(queued[dep])
        return self._afterok(dependencies)

    def _afterok(self, job_ids: list[str]) -> list[str]:
        """Dependencies as sbatch takes them, each once: every task of an array this submit
        queued (a merge after all shards) is the array's own id, which SLURM's afterok reads as
        'after every task'; some of its tasks stay as <array>_<index>."""
        wanted = list(dict.fromkeys(job_ids))
        whole = {array for array, size in self._arrays.items() if {f"{array}_{i}" for i in range(size)} <= set(wanted)}
        return list(dict.fromkeys(slurm_queue.array_job_id(j) if slurm_queue.array_job_id(j) in whole else j for j in wanted))

    def _jobs(self) -> list[StageJob]:
        return [job for job in self.plan.jobs() if self.only is None or job in self.only]

    def _groups(self) -> dict[StageJob, ArrayGroup]:
        return {job: group for group in self.plan.array_groups() for job in group.jobs}

    def _members(self, group: ArrayGroup) -> list[StageJob]:
        """The group's jobs this submit acts on (a selection may leave some out), in task order."""
        return [job for job in group.jobs if self.only is None or job in self.only]

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

    def _adopt_tagged_arrays(self, ledger: Ledger, tagged: dict[str, str]) -> None:
        """Record the tasks of a queued array that this ledger has not recorded: its tasks.json
        (written before its sbatch) names them, in index order, with the nonces they had then;
        an array whose tasks have been recorded since is not adopted again."""
        for group in self.plan.array_groups():
            for manifest in sorted(self.layout.store.array_jobs(group.name).glob("*.tasks.json")):
                try:
                    saved = json.loads(manifest.read_text())
                except (OSError, ValueError):
                    continue
                array_id = tagged.get(saved.get("tag", ""))
                tasks = [StageJob(**task["job"]) for task in saved.get("tasks", [])]
                if array_id is None or [ledger.nonce(job) for job in tasks] != [task["nonce"] for task in saved["tasks"]]:
                    continue
                self.echo(f"{group.name}: adopting SLURM job array {array_id} ({len(tasks)} tasks), queued by an earlier submit that did not record it")
                for index, job in enumerate(tasks):
                    ledger.record(job, f"{array_id}_{index}", tag=saved["tag"], array=array_id, task=index, group=group.name, adopted=True)
                self._link_logs(group, array_id, tasks)

    def _sbatch(self, job: StageJob, dependencies: list[str], nonce: str) -> str:
        executor = submitit.SlurmExecutor(folder=self.layout.store.job(job).jobs, max_num_timeout=self.resources[job.stage].max_requeues)
        executor.update_parameters(**self.sbatch_parameters(job, dependencies, nonce))
        queue = lambda: executor.submit(stage_job_entry, str(self.layout.runs_root), job.stage, job.key, job.repeat).job_id  # noqa: E731
        return self._with_retries(f"{job.id} (cell {self.plan.users(job)[0]})", nonce, queue)

    def _sbatch_array(self, group: ArrayGroup, tasks: list[StageJob], dependencies: list[str], tag: str, nonces: list[str]) -> str:
        """One sbatch for the tasks (submitit's batch(): --array=0-(n-1)%K over one folder);
        the array's id. Its tasks.json, written first, lets a later submit adopt it."""
        first = tasks[0]
        folder = self.layout.store.array_jobs(group.name)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"{tag}.tasks.json", {
            "group": group.name, "tag": tag, "tasks": [{"job": job.to_json(), "nonce": nonce} for job, nonce in zip(tasks, nonces)]})
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=self.resources[first.stage].max_requeues)
        executor.update_parameters(**self.array_parameters(group, first, dependencies, tag))

        def queue() -> str:
            with executor.batch():
                handles = [executor.submit(stage_job_entry, str(self.layout.runs_root), job.stage, job.key, job.repeat) for job in tasks]
            return slurm_queue.array_job_id(handles[0].job_id)

        array_id = self._with_retries(f"job array {group.name}", tag, queue)
        self._link_logs(group, array_id, tasks)
        return array_id

    def _link_logs(self, group: ArrayGroup, array_id: str, tasks: list[StageJob]) -> None:
        """Each task's log, which SLURM writes in the array's folder, linked from its stage job's
        jobs/ folder, where status and `logs` look (the link dangles until the task starts)."""
        folder = self.layout.store.array_jobs(group.name)
        for index, job in enumerate(tasks):
            jobs = self.layout.store.job(job).jobs
            jobs.mkdir(parents=True, exist_ok=True)
            for suffix in ("out", "err"):
                link = jobs / f"{array_id}_{index}_0_log.{suffix}"
                if not link.is_symlink():
                    link.symlink_to(folder / link.name)

    def _with_retries(self, what: str, nonce: str, queue: Callable[[], str]) -> str:
        """queue() (one sbatch) up to SUBMIT_ATTEMPTS times; before each retry the job tagged
        `nonce` is looked for, since a failed sbatch may have queued it after all."""
        error: Exception | None = None
        for attempt in range(SUBMIT_ATTEMPTS):
            if attempt:
                queued = slurm_queue.queued_by_tag().get(nonce)
                if queued is not None:
                    self.echo(f"{what}: sbatch reported a failure but queued job {queued}; adopting it")
                    return queued
            try:
                job_id = queue()
                self._sbatch_count += 1
                if _fault_after_sbatch(self._sbatch_count):
                    os._exit(137)  # fault injection: a submit killed between sbatch and the ledger write
                return job_id
            except (submitit_utils.FailedJobError, submitit_utils.FailedSubmissionError, OSError) as exc:
                error = exc
                if attempt + 1 < SUBMIT_ATTEMPTS:
                    time.sleep(BACKOFF_S * 2**attempt)
        message = str(error).strip().splitlines()[-1] if error and str(error).strip() else repr(error)
        raise SubmissionError(f"sbatch failed {SUBMIT_ATTEMPTS} times for {what}: {message} (earlier submissions are in the ledger)")

    def array_parameters(self, group: ArrayGroup, first: StageJob, dependencies: list[str], tag: str = "<tag>") -> dict:
        """A group's sbatch parameters: its first task's stage resources (a group is of one
        stage), its name, and SLURM's %K (submitit's array_parallelism)."""
        return {**self.sbatch_parameters(first, dependencies, tag),
                "job_name": f"dpr-{first.stage}-array-{self.plan.users(first)[0]}", "array_parallelism": group.parallel}

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
        groups = self._groups()
        waits = lambda job: [f"<{dep.id}>" for dep in self.plan.dependencies(job) if not self._complete(dep)]  # noqa: E731
        for job in self._jobs():
            group = groups.get(job)
            tasks = [task for task in self._members(group) if not self._complete(task)] if group else []
            if self._complete(job) or (len(tasks) > 1 and job != tasks[0]):
                continue
            if len(tasks) > 1:  # the group's array, shown where its first task comes
                folder = self.layout.store.array_jobs(group.name)
                deps = list(dict.fromkeys(dep for task in tasks for dep in waits(task)))
                params = {**self.array_parameters(group, job, deps), "map_count": len(tasks)}
                listed = "\n".join(f"# task {index}: {task.id}" for index, task in enumerate(tasks))
                scripts.append((job, _make_sbatch_string(command=_submit_command(folder), folder=folder, **params) + listed + "\n"))
                continue
            folder = self.layout.store.job(job).jobs
            scripts.append((job, _make_sbatch_string(command=_submit_command(folder), folder=folder, **self.sbatch_parameters(job, waits(job)))))
        return scripts


def _submit_command(folder: Path) -> str:
    """The command line of submitit's sbatch script, as submitit writes it."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def _fault_after_sbatch(count: int) -> bool:
    """DPR_HPC_FAULT=kill-after-sbatch:N: the test hook that kills a submit right after its Nth
    sbatch, before the ledger records it."""
    fault = os.environ.get("DPR_HPC_FAULT", "")
    return fault.startswith("kill-after-sbatch:") and count == int(fault.split(":", 1)[1])
