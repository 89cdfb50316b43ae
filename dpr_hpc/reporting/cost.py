"""What each stage job cost: wall time, queue wait, restarts, GPU- or CPU-hours, peak memory
against what was requested, per job and summed per cell and per grid.

On SLURM the scheduler's accounting is asked once for every job of the grid (one batched
sacct) and merged with the records; on the local backend, or where sacct does not answer, the
records alone give what they hold (no queue wait, nothing requested). Each row says which
source gave which figure, so a figure is never taken for the scheduler's when it is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

from dpr_hpc.tracking.live import accounting
from dpr_hpc.tracking.slurm_queue import JobAccounting, memory_mb
from dpr_hpc.tracking.ledger import Ledger
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.provenance import node_label
from dpr_hpc.store.records import Records

JOB_COLUMNS = ["stage", "repeat", "key", "cells", "job_id", "node", "wall_s", "queue_wait_s", "restarts", "gpu_hours", "cpu_hours",
               "cpu_time_s", "peak_rss_mb", "requested_mem_mb", "peak_gpu_mb", "gpu_mem_mb", "source"]
SUMMED = ["wall_s", "queue_wait_s", "restarts", "gpu_hours", "cpu_hours", "cpu_time_s"]


@dataclass
class CostTable:
    jobs: pd.DataFrame  # one row per stage job
    cells: pd.DataFrame  # per cell: the sum over the jobs it uses (a shared job counts in each)
    grid: dict[str, Any]  # the sum over distinct jobs
    sacct_note: str  # how the scheduler's accounting was read, or why not


def cost_table(plan: Plan, records: Records, ledger: Ledger) -> CostTable:
    jobs = [job for job in plan.jobs() if records.check(job).complete or ledger.latest(job)]
    sacct = accounting(ledger, records, jobs)
    rows = [_job_row(plan, job, records.check(job).record, sacct.of(job)) for job in jobs]
    table = pd.DataFrame(rows, columns=JOB_COLUMNS)
    return CostTable(table, _per_cell(plan, table, jobs), _total(table), sacct.note)


def _job_row(plan: Plan, job: StageJob, record: dict[str, Any] | None, sacct: JobAccounting | None) -> dict[str, Any]:
    """The scheduler's figure where it has one, else the record's, and which gave which."""
    node = (record or {}).get("node", {})
    timings = (record or {}).get("timings", {})
    from_sacct, from_record = [], []

    wall_s = sacct.elapsed_s if sacct else None
    if wall_s is not None:
        from_sacct.append("wall")
    elif record:
        wall_s = _seconds_between(record.get("started_at"), record.get("finished_at"))
        from_record.append("wall")
    queue_wait_s = sacct.queue_wait_s if sacct else None
    if queue_wait_s is not None:
        from_sacct.append("wait")
    peak_rss_mb = sacct.max_rss_mb if sacct else None
    if peak_rss_mb is not None:
        from_sacct.append("MaxRSS")
    elif timings.get("peak_rss_mb") is not None:
        peak_rss_mb = timings["peak_rss_mb"]
        from_record.append("RSS")
    requested_mem_mb = (sacct.alloc_mem_mb or memory_mb(sacct.req_mem.rstrip("nc"))) if sacct else None
    restarts = _restarts(record)
    if restarts is not None:
        from_record.append("restarts")

    gpus = sacct.gpus if sacct else (1 if node.get("device") == "cuda" else 0)
    cpus = (sacct.cpus if sacct and sacct.cpus else None) or _record_cpus(record)
    (from_sacct if sacct else from_record).append("GPU/CPU count")
    cpu_time_s = sacct.total_cpu_s if sacct else None
    if cpu_time_s is not None:
        from_sacct.append("TotalCPU")
    hours = (wall_s or 0.0) / 3600.0
    peak_gpu_mb = timings.get("peak_gpu_mb")
    if peak_gpu_mb is not None:
        from_record.append("GPU mem")
    source = "; ".join(part for part in (
        f"sacct: {', '.join(from_sacct)}" if from_sacct else "", f"record: {', '.join(from_record)}" if from_record else "") if part)
    return {
        "stage": job.stage, "repeat": job.repeat, "key": job.key[:8], "cells": len(plan.users(job)),
        "job_id": (sacct.job_id if sacct else node.get("slurm_job_id")) or None,
        "node": (sacct.node_list if sacct and sacct.node_list else (node_label(node) if node else None)),
        "wall_s": wall_s, "queue_wait_s": queue_wait_s, "restarts": restarts,
        "gpu_hours": hours * gpus if gpus and wall_s is not None else None,
        "cpu_hours": hours * cpus if not gpus and wall_s is not None else None,
        "cpu_time_s": cpu_time_s, "peak_rss_mb": peak_rss_mb, "requested_mem_mb": requested_mem_mb,
        "peak_gpu_mb": peak_gpu_mb, "gpu_mem_mb": node["gpu_memory_gb"] * 1024 if node.get("gpu_memory_gb") else None,
        "source": source or "none",
    }


def _restarts(record: dict[str, Any] | None) -> int | None:
    if not record:
        return None
    details = record.get("details", {})
    if details.get("restarts") is not None:
        return int(details["restarts"])
    count = record.get("node", {}).get("slurm_restart_count")
    return int(count) if count not in (None, "") else 0


def _record_cpus(record: dict[str, Any] | None) -> int:
    """The CPUs the job had: SLURM's allotment where it ran under SLURM, else the threads it used."""
    if not record:
        return 1
    node = record.get("node", {})
    if node.get("slurm_cpus_per_task"):
        return int(node["slurm_cpus_per_task"])
    threads = record.get("details", {}).get("threads")
    return int(threads) if isinstance(threads, int) and threads > 0 else int(node.get("cpu_count") or 1)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None


def _per_cell(plan: Plan, jobs: pd.DataFrame, job_list: list[StageJob]) -> pd.DataFrame:
    rows = []
    for cell in plan.cells:
        mine = [i for i, job in enumerate(job_list) if cell.cell_id in plan.users(job)]
        part = jobs.iloc[mine]
        rows.append({"cell_id": cell.cell_id, "jobs": len(part), **{c: _sum(part[c]) for c in SUMMED},
                     "max_peak_rss_mb": _max(part["peak_rss_mb"]), "max_peak_gpu_mb": _max(part["peak_gpu_mb"])})
    return pd.DataFrame(rows)


def _total(jobs: pd.DataFrame) -> dict[str, Any]:
    return {"jobs": len(jobs), **{c: _sum(jobs[c]) for c in SUMMED},
            "max_peak_rss_mb": _max(jobs["peak_rss_mb"]), "max_peak_gpu_mb": _max(jobs["peak_gpu_mb"])}


def _sum(values: pd.Series) -> float | None:
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    return float(numbers.sum()) if len(numbers) else None


def _max(values: pd.Series) -> float | None:
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    return float(numbers.max()) if len(numbers) else None
