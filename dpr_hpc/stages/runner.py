"""The entry point of every stage job, whichever backend runs it: read the cell from the run
folder, run the stage, write its tagged result record (or a failure marker)."""

from __future__ import annotations

import os
import shutil
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dpr_hpc.layout import RunLayout
from dpr_hpc.plan import StageJob
from dpr_hpc.provenance import node_tags, now_iso
from dpr_hpc.resume.signals import StopRequest, TrainingInterrupted
from dpr_hpc.results import make_record, write_record
from dpr_hpc.runstate import load_cell, mark_failed, mark_interrupted, mark_running

# A training stopped by a signal, its checkpoint written, and not requeued by submitit (plain
# SIGTERM, or no submitit handler): the job ends with this code and a resubmit resumes it.
EXIT_INTERRUPTED = 3

if TYPE_CHECKING:  # the stages import torch; submitting jobs should not wait for that
    from dpr_hpc.stages.common import StageOutput


def _stage_functions() -> dict[str, Callable[..., "StageOutput"]]:
    from dpr_hpc.stages.index import index
    from dpr_hpc.stages.infer import infer
    from dpr_hpc.stages.train import train

    return {"train": train, "index": index, "infer": infer}


class StageJobEntry:
    """What every backend submits: runs one stage job, and is checkpointable for submitit.

    On the warning signal before a time limit (or on preemption) submitit calls `checkpoint`
    and requeues the job with what it returns: the same stage job, which resumes from the state
    on disk (the training's checkpoint, the index's finished shards).
    """

    def __call__(self, run_root: str, cell_id: str, stage: str, repeat: int) -> dict[str, Any]:
        return run_stage_job(run_root, cell_id, stage, repeat)

    def checkpoint(self, run_root: str, cell_id: str, stage: str, repeat: int):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, run_root, cell_id, stage, repeat)


stage_job_entry = StageJobEntry()


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
    stop = StopRequest().install() if stage == "train" else None
    try:
        if stop is None:
            output = _stage_functions()[stage](cell, layout, repeat)
        else:
            output = _stage_functions()[stage](cell, layout, repeat, stop=stop)
    except TrainingInterrupted as stopped:
        paths.running.unlink(missing_ok=True)
        mark_interrupted(paths, str(stopped))
        print(str(stopped), flush=True)
        if stop is not None:
            stop.hand_over()  # under submitit: requeues this job and exits
        raise SystemExit(EXIT_INTERRUPTED) from None
    except BaseException as error:
        traceback.print_exc()
        mark_failed(paths, error)
        raise
    finally:
        paths.running.unlink(missing_ok=True)
        if stop is not None:
            stop.restore()
    details = {**output.details, "threads": threads}
    record = make_record(
        cell, job, metrics=output.metrics, timings=output.timings, node=node,
        started_at=started_at, finished_at=now_iso(), artifacts=output.artifacts, details=details,
    )
    write_record(paths.result, record)
    for folder in output.discard:
        shutil.rmtree(folder, ignore_errors=True)
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
