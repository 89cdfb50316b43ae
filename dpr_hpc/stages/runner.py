"""The entry point of every stage job, whichever backend runs it: claim the job's folder in the
store, read its settings, run the stage into a working attempt, write its record with the
provenance of everything it read (or a failure marker), and release the claim."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dpr_hpc.store.claims import StageClaim, beats_missed, claim_job_id, claim_stage
from dpr_hpc.errors import ClaimLostError, StageClaimedError, StageInputError
from dpr_hpc.fsutil import write_json_atomic
from dpr_hpc.grid.config import cell_from_json
from dpr_hpc.planning.plan import StageJob
from dpr_hpc.provenance import node_tags, now_iso
from dpr_hpc.resume.signals import StopRequest, TrainingInterrupted, wait_while_stage_held
from dpr_hpc.store.records import Records, describe_artifacts, make_record, promote, write_record
from dpr_hpc.store.markers import mark_failed, mark_interrupted, read_marker
from dpr_hpc.planning.stage_keys import stage_inputs
from dpr_hpc.store.paths import AttemptPaths, StageSpec, StageStore

# A training stopped by a signal, its checkpoint written, and not requeued by submitit (plain
# SIGTERM, or no submitit handler): the job ends with this code and a resubmit resumes it.
EXIT_INTERRUPTED = 3
# A second copy of a job whose claim another process holds: it wrote nothing. Also a copy whose
# claim another one took while it ran: it wrote nothing from then on.
EXIT_CLAIMED = 4

if TYPE_CHECKING:  # the stages import torch; submitting jobs should not wait for that
    from dpr_hpc.grid import CellConfig
    from dpr_hpc.stages.common import StageIO, StageOutput


def _stage_functions() -> dict[str, Callable[..., "StageOutput"]]:
    from dpr_hpc.stages.corpus import encode_shard, merge, search_shard
    from dpr_hpc.stages.index import index
    from dpr_hpc.stages.infer import infer
    from dpr_hpc.stages.train import train

    return {"train": train, "index": index, "infer": infer, "encode-shard": encode_shard, "search-shard": search_shard, "merge": merge}


class StageJobEntry:
    """What every backend submits: runs one stage job, and is checkpointable for submitit.

    On the warning signal before a time limit (or on preemption) submitit calls `checkpoint`
    and requeues the job with what it returns: the same stage job, which resumes from the state
    its working attempt holds (the training's checkpoint, the index's finished shards).
    """

    def __call__(self, runs_root: str, stage: str, key: str, repeat: int) -> dict[str, Any]:
        headline = run_stage_job(runs_root, stage, key, repeat)
        # The record is written. A time-limit warning that lands from here on (SLURM may send it
        # early, and one that reaches the interpreter while it exits kills it by default) would
        # turn a finished job into a FAILED one, and SLURM cancels the jobs that depend on it.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return headline

    def checkpoint(self, runs_root: str, stage: str, key: str, repeat: int):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, runs_root, stage, key, repeat)


stage_job_entry = StageJobEntry()


def run_stage_job(runs_root: str, stage: str, key: str, repeat: int) -> dict[str, Any]:
    """Run one stage job to completion; returns the headline figures of its record. A second
    copy of a job that is running exits at once (StageClaimedError) without writing."""
    quiet_libraries()
    threads = fit_threads_to_allocation()
    store = StageStore.at(Path(runs_root))
    job = StageJob(stage, key, repeat)
    folder = store.job(job)
    folder.dir.mkdir(parents=True, exist_ok=True)
    try:
        claim = claim_stage(folder, job, holder_ended=slurm_job_ended)
    except StageClaimedError as held:
        print(f"dpr-hpc: {held}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CLAIMED) from None
    try:
        return _run_claimed(store, job, threads, claim)
    except ClaimLostError as lost:
        print(f"dpr-hpc: {lost}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CLAIMED) from None
    finally:
        claim.release()


def slurm_job_ended(holder: dict) -> bool:
    """Whether the SLURM job (or array task) that holds a claim has missed two heartbeats and is
    listed by the scheduler as ended (a requeue reads as ended for a moment, and the job's next
    run takes its claim back within seconds). False whenever that is not known (no SLURM job named, no SLURM here, no answer, not
    listed): the claim's heartbeat then decides, as before."""
    from dpr_hpc.errors import SchedulerError, SchedulerUnreachableError
    from dpr_hpc.tracking import slurm_queue

    job_id = claim_job_id(holder)
    if not job_id or not beats_missed(holder) or not slurm_queue.slurm_available():
        return False
    try:
        info = slurm_queue.query([str(job_id)]).jobs.get(str(job_id))
    except (SchedulerError, SchedulerUnreachableError):
        return False
    return info is not None and not info.active


def _run_claimed(store: StageStore, job: StageJob, threads: int | None, claim: StageClaim) -> dict[str, Any]:
    spec = store.read_spec(job.stage, job.key)
    cell = cell_from_json(spec.cell)
    records = Records(store)
    current = records.check(job)
    if current.complete:
        if promote(store.job(job), current):
            print(f"{job.id}: attempt {current.attempt} completed but its result.json was never written; it is the record now", flush=True)
        print(f"{job.id}: already complete (attempt {current.attempt}); nothing to do", flush=True)
        return _headline(current.record)
    if current.state == "unreadable":
        raise StageInputError(f"{job.id}: its record cannot be read, so it is not rerun: {current.reason}")
    io = _stage_io(store, records, job, spec, current.attempt, claim.check)
    paths = io.out
    note_scheduler_job(paths)
    if current.state != "missing":
        print(f"{job.id}: rerunning as attempt {paths.number}: the record of attempt {current.attempt} is {current.state} ({current.reason})", flush=True)
    paths.failure.unlink(missing_ok=True)
    paths.interrupted.unlink(missing_ok=True)
    inputs = _input_provenance(cell, job.stage, records)
    started_at, node = now_iso(), node_tags()
    stop = StopRequest().install() if job.stage == "train" else None
    try:
        if stop is None:
            wait_while_stage_held(job.stage)
            output = _stage_functions()[job.stage](cell, io, job.repeat)
        else:
            output = _stage_functions()[job.stage](cell, io, job.repeat, stop=stop)
    except ClaimLostError:
        raise
    except TrainingInterrupted as stopped:
        claim.check()
        mark_interrupted(paths, str(stopped))
        print(str(stopped), flush=True)
        if stop is not None:
            stop.hand_over()  # under submitit: requeues this job and exits
        raise SystemExit(EXIT_INTERRUPTED) from None
    except BaseException as error:
        traceback.print_exc()
        _check_unless_unreadable(claim)  # a failure marker in another copy's attempt would fail it
        mark_failed(paths, error)
        raise
    finally:
        if stop is not None:
            stop.restore()
    upstream = {up.id: records.check(up).digest for up in _upstream_jobs(spec.upstream).values()}
    record = make_record(
        cell, job, attempt=paths.number, inputs=inputs, upstream=upstream,
        metrics=output.metrics, timings=output.timings, node=node, started_at=started_at, finished_at=now_iso(),
        artifacts=describe_artifacts(paths, output.artifacts), details={**output.details, "threads": threads},
    )
    write_record(store.job(job), paths, record, before_each=claim.check)
    for leftover in output.discard:
        _discard(leftover)
    return _headline(record)


def _check_unless_unreadable(claim: StageClaim) -> None:
    """The claim check on a path that already failed: an unreadable claim.lock must not hide
    the error being reported."""
    try:
        claim.check()
    except OSError:
        pass


def _discard(path: Path) -> None:
    """A stage's scratch output, gone once its record is written: a folder (the index's shards,
    the training's resume state) or a file (the index's embeddings, GBs at NQ's size)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def note_scheduler_job(paths: "AttemptPaths") -> None:
    """Add the submitit job now running to the attempt's list, so that `dpr-hpc logs --attempt`
    finds the logs of every job that worked on it (a resumed training has several)."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return  # called in-process (tests, notebooks): no scheduler job, no log file
    import submitit

    job_id = submitit.JobEnvironment().job_id
    noted = read_marker(paths.job_ids) or {"job_ids": []}
    if job_id not in noted["job_ids"]:
        write_json_atomic(paths.job_ids, {"job_ids": [*noted["job_ids"], job_id]})


def prepare_io(runs_root: Path, job: StageJob) -> tuple["CellConfig", "StageIO"]:
    """The settings and the StageIO a job runs with, as the runner hands them over: for
    calling a stage function in-process (tests, notebooks) without claiming or recording."""
    store = StageStore.at(runs_root)
    spec = store.read_spec(job.stage, job.key)
    records = Records(store)
    return cell_from_json(spec.cell), _stage_io(store, records, job, spec, records.check(job).attempt)


def _upstream_jobs(upstream: dict[str, str]) -> dict[str, StageJob]:
    """The upstream jobs a spec names, by slot (its stage, or a shard stage and its shard)."""
    from dpr_hpc.planning.plan import upstream_repeat
    from dpr_hpc.planning.stage_keys import stage_of

    return {name: StageJob(stage_of(name), key, upstream_repeat(name)) for name, key in upstream.items()}


def _stage_io(store: StageStore, records: Records, job: StageJob, spec: StageSpec, complete_attempt: int | None,
              check_claim: Callable[[], None] | None = None) -> "StageIO":
    """The job's working attempt, the complete upstream outputs it reads and the hub commits it
    loads; an upstream that is not complete stops the job before it writes anything."""
    from dpr_hpc.planning.stage_keys import shard_of
    from dpr_hpc.stages.common import StageIO

    read: dict[str, Any] = {}
    digests: dict[str, str] = {}
    attempts: dict[str, AttemptPaths] = {}
    for name, up in _upstream_jobs(spec.upstream).items():
        check = records.check(up)
        if not check.complete:
            raise StageInputError(f"{job.id}: its input {up.id} is {check.state}" + (f": {check.reason}" if check.reason else ""))
        attempts[name] = records.attempt_of(up)
        if up.stage in ("train", "index"):
            read["trained" if up.stage == "train" else "index"] = attempts[name]
        digests[up.id] = check.digest
    out = store.job(job).working_attempt(complete_attempt)
    if check_claim is not None:
        read["check_claim"] = check_claim
    return StageIO(job=job, out=out, prepared_cache=store.prepared_cache, token_cache=store.token_cache,
                   hub_revisions=spec.hub_revisions, upstream_digests=digests, upstream=attempts, shard=shard_of(spec.slot), **read)


def _input_provenance(cell, stage: str, records: Records) -> dict[str, Any]:
    """The content of every file and local folder the stage reads, as it is when it starts."""
    provenance = {}
    for role, (kind, path) in stage_inputs(cell, stage).items():
        digest = records.hashes.folder(path) if kind == "folder" else records.hashes.file(path)
        provenance[role] = {"kind": kind, "path": str(path), "sha256": digest}
    records.hashes.save()
    return provenance


def _headline(record: dict[str, Any]) -> dict[str, Any]:
    return {"timings": record["timings"], "metrics": {k: v for k, v in record["metrics"].items() if not isinstance(v, list)}}


def fit_threads_to_allocation() -> int | None:
    """Use the CPUs SLURM allotted to the job, not every core of the node: torch and FAISS
    start one OpenMP thread per core, and two 1-CPU jobs on a 2-core node then spin against each
    other (measured: a 20 s training still unfinished after 4.5 min)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if not cpus.isdigit():
        return None
    import faiss
    import torch

    torch.set_num_threads(int(cpus))
    faiss.omp_set_num_threads(int(cpus))
    return int(cpus)


def quiet_libraries() -> None:
    """Progress bars of weight loading would drown the stage's own progress lines in the log."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
