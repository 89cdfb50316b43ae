"""Grid -> plan: every cell expanded into stage jobs (cell x stage x repeat) with their dependencies.

Training runs once per cell; every index repeat reads the cell's one checkpoint, and every infer
repeat searches the index of index repeat 0, so repeats differ only in the timing they measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from dpr_hpc.grid import CellConfig, Grid


@dataclass(frozen=True, order=True)
class StageJob:
    """One schedulable unit: a stage of a cell, one repeat of it."""

    cell_id: str
    stage: str
    repeat: int

    @property
    def key(self) -> str:
        return f"{self.cell_id}/{self.stage}/r{self.repeat}"

    def to_json(self) -> dict[str, Any]:
        return {"cell_id": self.cell_id, "stage": self.stage, "repeat": self.repeat}


@dataclass(frozen=True)
class Plan:
    grid_name: str
    cells: tuple[CellConfig, ...]

    def cell(self, cell_id: str) -> CellConfig:
        for cell in self.cells:
            if cell.cell_id == cell_id:
                return cell
        raise KeyError(cell_id)

    def jobs(self) -> Iterator[StageJob]:
        """Stage jobs in an order where every job comes after the jobs it depends on."""
        for cell in self.cells:
            for stage in cell.stages:
                for repeat in range(cell.repeats.of(stage)):
                    yield StageJob(cell.cell_id, stage, repeat)

    def dependencies(self, job: StageJob) -> tuple[StageJob, ...]:
        """The jobs whose outputs this job reads: train's checkpoint, index repeat 0's index."""
        cell = self.cell(job.cell_id)
        if job.stage == "index" and not cell.evaluate_only:
            return (StageJob(job.cell_id, "train", 0),)
        if job.stage == "infer":
            return (StageJob(job.cell_id, "index", 0),)
        return ()

    def to_json(self) -> dict[str, Any]:
        return {
            "grid": self.grid_name,
            "cells": [cell.to_json() for cell in self.cells],
            "jobs": [
                {**job.to_json(), "depends_on": [dep.key for dep in self.dependencies(job)]} for job in self.jobs()
            ],
        }


def make_plan(grid: Grid) -> Plan:
    return Plan(grid.name, grid.cells)
