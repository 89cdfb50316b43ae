"""The one owner of a grid's run folder; stage outputs live in the shared store (store.py).

    <runs root>/<grid name>/
        grid.json          which grid file this run folder belongs to
        plan.json          the grid's current cells, their stage keys and the stage jobs
        cells.json         every cell ever planned here, with its keys: cells that left the
                           grid keep their results, and status and collect count them
        submit.lock        held while a local submit runs
        models.json        each hub model the grid names, with the commit its jobs load
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dpr_hpc.store.paths import StageStore

DEFAULT_RUNS_ROOT = Path("runs")
RUNS_ROOT_VARIABLE = "DPR_HPC_RUNS"


def runs_root_or_default(runs_root: "str | Path | None" = None) -> Path:
    """The runs root a command or a Python caller acts on: the one given, else $DPR_HPC_RUNS,
    else ./runs. The one place that default is decided, so `load_results` in a notebook finds
    what `dpr-hpc submit` wrote."""
    if runs_root is not None:
        return Path(runs_root)
    return Path(os.environ.get(RUNS_ROOT_VARIABLE, DEFAULT_RUNS_ROOT))


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def for_grid(cls, grid_name: str, runs_root: Path = DEFAULT_RUNS_ROOT) -> "RunLayout":
        return cls(Path(runs_root).resolve() / grid_name)

    @property
    def runs_root(self) -> Path:
        return self.root.parent

    @property
    def store(self) -> StageStore:
        """The stage store every grid under the same runs root shares."""
        return StageStore.at(self.runs_root)

    @property
    def grid_binding(self) -> Path:
        return self.root / "grid.json"

    @property
    def plan_file(self) -> Path:
        return self.root / "plan.json"

    @property
    def cells_history(self) -> Path:
        return self.root / "cells.json"

    @property
    def hub_models(self) -> Path:
        return self.root / "models.json"

    @property
    def submit_lock(self) -> Path:
        return self.root / "submit.lock"
