"""One writer per stage job: a job claims its folder before it writes anything.

The claim is a lock file (dpr_hpc.locks) holding host, pid, SLURM job id and a heartbeat that
a thread refreshes every CLAIM_HEARTBEAT_S. A second copy of the same stage job (a local
submit while SLURM runs it, an sbatch that was retried after it had in fact queued the job)
finds the claim held and exits at once, naming the holder, having written nothing. A claim
whose heartbeat is older than CLAIM_STALE_AFTER_S, or whose process is gone from this host,
belongs to a job that died: the next copy takes it over, and `status` reads the job as
INTERRUPTED rather than RUNNING forever. A claim left by an earlier run of the same SLURM job
(requeued after a node failure or a preemption, maybe onto another node) is the job's own, and
taken over at once (dpr_hpc.locks.earlier_run_of_this_job).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dpr_hpc.errors import ClaimLostError, LockHeldError, StageClaimedError
from dpr_hpc.locks import LockFile, describe_holder, holder_is_stale
from dpr_hpc.planning.plan import StageJob
from dpr_hpc.store.paths import JobFolder

CLAIM_HEARTBEAT_S = 60.0
CLAIM_STALE_AFTER_S = 600.0


@dataclass(frozen=True)
class StageClaim:
    """A stage job's claim while it runs. Each acquisition carries a fresh random token; the job
    re-reads claim.lock before every write another copy could clash with (a checkpoint, an
    embedding shard, its record) and stops once the token there is not its own."""

    job: StageJob
    lock: LockFile

    def check(self) -> None:
        """Raise ClaimLostError unless this job still holds its claim."""
        try:
            self.lock.verify()
        except LockHeldError as lost:
            raise ClaimLostError(f"{self.job.id}: its claim was taken over while it ran ({describe_holder(lost.holder)}); "
                                 "this copy stops here and writes nothing more") from None

    def release(self) -> None:
        self.lock.release()


def claim_stage(folder: JobFolder, job: StageJob, holder_ended: Callable[[dict], bool] | None = None) -> StageClaim:
    """Claim the job's folder, or raise StageClaimedError naming a live holder. `holder_ended`
    (the runner asks SLURM) makes a holder whose SLURM job has ended dead at once, wherever it ran:
    a shard killed on one node and rerun on another need not watch a heartbeat for 600 s."""
    lock = LockFile(folder.claim, purpose=job.id, stale_after_s=CLAIM_STALE_AFTER_S, heartbeat_s=CLAIM_HEARTBEAT_S,
                    holder_ended=holder_ended)
    try:
        return StageClaim(job, lock.acquire(timeout_s=0))
    except LockHeldError as held:
        raise StageClaimedError(f"{job.id} is already being written by another job ({describe_holder(held.holder)}); "
                                "this copy exits without writing anything") from None


def live_claim(folder: JobFolder) -> dict | None:
    """The holder of a claim that is alive, or None (no claim, or a dead one)."""
    holder = LockFile.read_holder(folder.claim)
    if holder is None or claim_is_dead(holder):
        return None
    return holder


def dead_claim(folder: JobFolder) -> dict | None:
    """The holder of a claim left behind by a job that died, or None."""
    holder = LockFile.read_holder(folder.claim)
    return holder if holder is not None and claim_is_dead(holder) else None


def claim_job_id(holder: dict) -> str | None:
    """The SLURM job a claim's holder ran in, as the ledger and the scheduler name it: an array
    task as '<array>_<task>', else the job id; None for a holder outside SLURM."""
    array, task = holder.get("slurm_array_job_id"), holder.get("slurm_array_task_id")
    if array and task is not None:
        return f"{array}_{task}"
    return str(holder["slurm_job_id"]) if holder.get("slurm_job_id") else None


def beats_missed(holder: dict, beats: int = 2) -> bool:
    """Whether the holder has not refreshed its heartbeat for `beats` beats. A requeued job's
    earlier run stops beating too, but its next run takes the claim over within seconds; only a
    holder that stays silent this long, with its SLURM job ended, is taken for dead before the
    claim goes stale."""
    import time

    return time.time() - float(holder.get("heartbeat") or 0) > beats * CLAIM_HEARTBEAT_S


def claim_is_dead(holder: dict) -> bool:
    return holder_is_stale(holder, CLAIM_STALE_AFTER_S)
