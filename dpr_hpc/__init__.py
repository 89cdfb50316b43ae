"""dpr-hpc: run the DPR encoder-efficiency grid (train -> index -> infer) on SLURM or locally.

The functions below are the service layer (dpr_hpc.api), the same one the `dpr-hpc` command
calls: plan, submit, status, cancel, load_results and report a grid from Python.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["plan", "submit", "prefetch", "status", "cancel", "logs", "collect", "load_results", "report"]


def __getattr__(name: str) -> Any:
    """`dpr_hpc.submit` and the rest import the service layer only when first used, so that
    `import dpr_hpc` (every stage job and CLI call does it) stays cheap: no torch, pandas or
    transformers until a function that needs them runs."""
    if name in __all__:
        from dpr_hpc import api

        return getattr(api, name)
    raise AttributeError(f"module 'dpr_hpc' has no attribute {name!r}")
