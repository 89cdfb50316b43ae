"""dpr-hpc: run the DPR encoder-efficiency grid (train -> index -> infer) on SLURM or locally."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_results"]


def __getattr__(name: str) -> Any:
    """`dpr_hpc.load_results` imports pandas and the collector only when first used, so that
    `import dpr_hpc` (every stage job and CLI call does it) stays cheap."""
    if name == "load_results":
        from dpr_hpc.reporting.frame import load_results

        return load_results
    raise AttributeError(f"module 'dpr_hpc' has no attribute {name!r}")
