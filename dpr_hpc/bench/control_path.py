"""Benchmark of the control path: how long `plan`, `status` and a submit with every job
already queued take on generated grids of growing size (issue 11's goal: <= 2 s at 2,000
cells, growing linearly).

The grids are real grid files loaded, planned and submitted through the SLURM backend's own
code; only the scheduler's answers are simulated (every job queued and pending), because one
batched sacct call costs the same whatever we do around it, and this machine has no cluster.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable
from unittest import mock

from dpr_hpc.tracking import slurm_queue
from dpr_hpc.grid.resources import default_resources
from dpr_hpc.backends.slurm import SlurmBackend
from dpr_hpc.grid import load_grid
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.tracking.ledger import Ledger
from dpr_hpc.planning.plan import make_plan
from dpr_hpc.provenance import node_tags, now_iso
from dpr_hpc.tracking.status import stage_states

SIZES = (100, 2000)
RECORD = {"question": "q?", "answers": ["a"], "positive_ctxs": [{"title": "t", "text": "a", "passage_id": "1"}]}


def run_control_benchmark(sizes: tuple[int, ...] = SIZES, echo: Callable[[str], None] = print) -> dict[str, Any]:
    report: dict[str, Any] = {"started_at": now_iso(), "node": node_tags(), "rows": []}
    for cells in sizes:
        with tempfile.TemporaryDirectory() as folder:
            row = _measure(Path(folder), cells)
        report["rows"].append(row)
        echo(f"{cells:>5} cells, {row['jobs']:>5} jobs: plan {row['plan_s']:.2f}s, submit (all queued) {row['submit_queued_s']:.2f}s, "
             f"status {row['status_s']:.2f}s")
    first, last = report["rows"][0], report["rows"][-1]
    report["growth"] = {phase: round(last[phase] / first[phase], 1) for phase in ("plan_s", "submit_queued_s", "status_s")}
    report["cells_ratio"] = last["cells"] / first["cells"]
    return report


def _measure(folder: Path, cells: int) -> dict[str, Any]:
    for name in ("train.json", "dev.json"):
        (folder / name).write_text(json.dumps([RECORD]))
    grid_file = folder / "grid.yaml"
    sizes = ", ".join(str(8 + i) for i in range(cells))
    grid_file.write_text(f"name: scale\ndata: {{train: train.json, dev: dev.json}}\n"
                         f"blocks: [{{name: b, encoder: bert-base-uncased, embedding_sizes: [{sizes}]}}]\n")
    layout = RunLayout(folder / "runs" / "scale")

    started = time.perf_counter()
    plan = make_plan(load_grid(grid_file), layout.store.content_hashes())
    plan_s = time.perf_counter() - started
    jobs = list(plan.jobs())

    with ExitStack() as stack:
        queued = _simulated_queue(stack)
        backend = SlurmBackend(layout, plan, default_resources(), echo=lambda line: None)
        backend.submit(grid_file)  # the first submit queues everything (simulated sbatch)
        started = time.perf_counter()
        report = backend.submit(grid_file)
        submit_s = time.perf_counter() - started
        assert len(report.active) == len(jobs) and not report.ran, "the second submit must find every job queued"
        started = time.perf_counter()
        states = stage_states(layout, plan).states
        status_s = time.perf_counter() - started
        assert {s.state for s in states} == {"PENDING"} and len(queued) == len(jobs)
    return {"cells": cells, "jobs": len(jobs), "plan_s": round(plan_s, 3), "submit_queued_s": round(submit_s, 3), "status_s": round(status_s, 3)}


def _simulated_queue(stack: ExitStack) -> dict[str, slurm_queue.JobInfo]:
    """sbatch queues the job (pending); sacct and squeue answer from that queue."""
    queue: dict[str, slurm_queue.JobInfo] = {}

    def sbatch(self, job, dependencies, nonce):
        job_id = str(1000 + len(queue))
        queue[job_id] = slurm_queue.JobInfo(job_id, "PENDING", reason="Priority")
        return job_id

    stack.enter_context(mock.patch.object(SlurmBackend, "_sbatch", sbatch))
    stack.enter_context(mock.patch.object(slurm_queue, "query", lambda ids, since=None, users=(): slurm_queue.SchedulerView({i: queue[i] for i in ids if i in queue}, "simulated")))
    stack.enter_context(mock.patch.object(slurm_queue, "queued_by_tag", lambda: {}))
    stack.enter_context(mock.patch.object(slurm_queue, "submit_capacity", lambda: None))
    stack.enter_context(mock.patch.object(slurm_queue, "slurm_available", lambda: True))
    stack.enter_context(mock.patch.object(Ledger, "recently_submitted", lambda self, job, now=None: True))
    return queue
