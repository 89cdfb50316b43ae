"""The service layer: what every `dpr-hpc` command does, as Python functions that a notebook
calls too. Typed keyword arguments in, result objects out, progress lines through an optional
callback; nothing here parses arguments or prints. The command line (dpr_hpc.cli) only turns
its flags into these calls and renders what they return, so a Python caller runs exactly the
steps the command runs (the grid binding, the hub pins, the checkpoint checks).

    import dpr_hpc
    plan = dpr_hpc.plan("jobs/demo.yaml")                     # .cells, .jobs, .existing
    dpr_hpc.submit("jobs/demo.yaml", backend="local", cells="bert-*es32*")
    dpr_hpc.status("jobs/demo.yaml")                          # a DataFrame, one row per cell x stage job
    dpr_hpc.load_results("jobs/demo.yaml")

Importing this package is cheap: each function imports what it needs (torch, pandas,
submitit) when first called.
"""

from dpr_hpc.api.common import Progress, selection_of
from dpr_hpc.api.control import (STATUS_COLUMNS, CancelReport, GridCancel, RunStatus, StageLogs, cancel, logs, status,
                                 status_reports)
from dpr_hpc.api.launch import GridNotes, PlanReport, PrefetchReport, SubmitReport, plan, prefetch, submit
from dpr_hpc.api.results import CollectedTable, collect, load_results, report
from dpr_hpc.store.layout import runs_root_or_default

__all__ = [
    "plan", "submit", "prefetch", "status", "status_reports", "cancel", "logs", "collect", "load_results", "report",
    "PlanReport", "SubmitReport", "PrefetchReport", "GridNotes", "RunStatus", "CancelReport", "GridCancel", "StageLogs",
    "CollectedTable", "STATUS_COLUMNS", "Progress", "selection_of", "runs_root_or_default",
]
