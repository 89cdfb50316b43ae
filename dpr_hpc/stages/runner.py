"""The entry point of every stage job, whichever backend runs it: read the cell from the run
folder, run the stage, write its tagged result record (or a failure marker)."""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dpr_hpc.layout import RunLayout
from dpr_hpc.plan import StageJob
from dpr_hpc.provenance import node_tags, now_iso
from dpr_hpc.results import make_record, write_record
from dpr_hpc.runstate import load_cell, mark_failed, mark_running

if TYPE_CHECKING:  # the stages import torch; submitting jobs should not wait for that
    from dpr_hpc.stages.common import StageOutput


def _stage_functions() -> dict[str, Callable[..., "StageOutput"]]:
    from dpr_hpc.stages.index import index
    from dpr_hpc.stages.infer import infer
    from dpr_hpc.stages.train import train

    return {"train": train, "index": index, "infer": infer}


def run_stage_job(run_root: str, cell_id: str, stage: str, repeat: int) -> dict[str, Any]:
    """Run one stage job to completion; returns the headline figures of its record."""
    quiet_libraries()
    threads = fit_threads_to_allocation()
    layout = RunLayout(Path(run_root))
    job = StageJob(cell_id, stage, repeat)
    paths = layout.stage(job)
    paths.dir.mkdir(parents=True, exist_ok=True)
    cell = load_cell(layout, cell_id)
    mark_running(paths)
    started_at = now_iso()
    node = node_tags()
    try:
        output = _stage_functions()[stage](cell, layout, repeat)
    except BaseException as error:
        traceback.print_exc()
        mark_failed(paths, error)
        raise
    finally:
        paths.running.unlink(missing_ok=True)
    details = {**output.details, "threads": threads}
    record = make_record(
        cell, job, metrics=output.metrics, timings=output.timings, node=node,
        started_at=started_at, finished_at=now_iso(), artifacts=output.artifacts, details=details,
    )
    write_record(paths.result, record)
    return {"timings": output.timings, "metrics": {k: v for k, v in output.metrics.items() if not isinstance(v, list)}}


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
