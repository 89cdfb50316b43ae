"""dpr-hpc with every plan's index repeats grouped into one job array per index key: how the SLURM
backend's arrays are tested before the corpus stages (whose shards fill Plan.array_groups) exist.

    python tests/array_plan.py ARGS        # as python -m dpr_hpc ARGS

$DPR_HPC_TEST_ARRAY_PARALLEL is each array's %K (default 4). Stage jobs on the nodes need no patch:
a task runs one stage job by its stage, key and repeat, as a plain job does."""

from __future__ import annotations

import os
import sys

from dpr_hpc.planning.plan import ArrayGroup, Plan

PARALLEL_ENV = "DPR_HPC_TEST_ARRAY_PARALLEL"


def index_arrays(plan: Plan) -> list[ArrayGroup]:
    """One array per index key with two or more repeats, task i running repeat i."""
    by_key: dict[str, list] = {}
    for job in plan.jobs():
        if job.stage == "index":
            by_key.setdefault(job.key, []).append(job)
    parallel = int(os.environ.get(PARALLEL_ENV, "4"))
    return [ArrayGroup(f"index/{key}", tuple(jobs), parallel) for key, jobs in by_key.items() if len(jobs) > 1]


def patch() -> None:
    Plan.array_groups = index_arrays  # type: ignore[method-assign]


if __name__ == "__main__":
    patch()
    from dpr_hpc.cli.main import main

    raise SystemExit(main(sys.argv[1:]))
