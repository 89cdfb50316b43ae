"""A grid's SLURM resources per stage: its profile file (or the command line's) with the grid's
own `slurm.defaults`/`slurm.stages` on top. The schema and its validation are in
dpr_hpc.grid.resources, which the grid loader uses at load; the grid keeps its raw, validated
`slurm:` section and nothing in dpr_hpc.grid imports the backends.
"""

from __future__ import annotations

from pathlib import Path

from dpr_hpc.grid import Grid
from dpr_hpc.grid.resources import Resources, StageResources, read_profile, resolve, time_to_minutes

__all__ = ["Resources", "StageResources", "grid_resources", "load_profile", "time_to_minutes"]

load_profile = read_profile


def grid_resources(grid: Grid, profile: Path | None = None) -> Resources:
    """`profile` (the command line's) replaces the grid's own profile; the grid's overrides apply on top."""
    return resolve(profile or grid.slurm_profile, grid.slurm_overrides, str(grid.path))
