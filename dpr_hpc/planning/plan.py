"""Grid -> plan: every cell's stages, named by their stage keys, as a graph of stage jobs.

A stage job is one repeat of one stage key. Cells that agree on a stage's identity
(dpr_hpc.planning.stage_keys) share its jobs, so the plan has each job once however many cells, or
grids, use it. Training runs once per key; every index repeat reads the one trained model, and
every infer repeat searches the index of index repeat 0, so repeats differ only in timing.
Lookups are dictionaries built once: plan, submit and status stay linear in the grid's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from dpr_hpc.inputs.content import ContentHashes
from dpr_hpc.grid import CellConfig, Grid
from dpr_hpc.grid.config import cell_from_json
from dpr_hpc.planning.stage_keys import stage_keys

# Every infer repeat searches this index repeat's index.
SEARCHED_INDEX_REPEAT = 0


@dataclass(frozen=True, order=True)
class StageJob:
    """One schedulable unit: one repeat of the stage whose output `key` names."""

    stage: str
    key: str
    repeat: int

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.key}/r{self.repeat}"

    @property
    def short(self) -> str:
        return f"{self.stage} {self.key[:8]} r{self.repeat}"

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "key": self.key, "repeat": self.repeat}


@dataclass(frozen=True)
class ArrayGroup:
    """Stage jobs that SLURM runs as one job array (`--array=0-(N-1)%parallel`), task i running
    `jobs[i]`: the shards of one corpus stage. Each task is still its own stage job in the store
    (own key, claim, record and resume); the array is only how they are queued."""

    name: str  # unique in the plan, e.g. "encode-shard/<key of the corpus encoding>"
    jobs: tuple[StageJob, ...]
    parallel: int  # at most this many tasks run at once (SLURM's %K)


@dataclass
class Plan:
    grid_name: str
    cells: tuple[CellConfig, ...]
    keys: dict[str, dict[str, str]]  # cell id -> stage -> key
    _cells: dict[str, CellConfig] = field(init=False, repr=False)
    _jobs: list[StageJob] = field(init=False, repr=False)
    _users: dict[tuple[str, str], list[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cells = {cell.cell_id: cell for cell in self.cells}
        self._users = {}
        repeats: dict[tuple[str, str], int] = {}
        for cell in self.cells:
            for stage in cell.stages:
                node = (stage, self.keys[cell.cell_id][stage])
                self._users.setdefault(node, []).append(cell.cell_id)
                repeats[node] = max(repeats.get(node, 0), cell.repeats.of(stage))
        seen: set[StageJob] = set()
        self._jobs = []
        for cell in self.cells:
            for stage in cell.stages:
                node = (stage, self.keys[cell.cell_id][stage])
                for repeat in range(repeats[node]):
                    job = StageJob(stage, node[1], repeat)
                    if job not in seen:
                        seen.add(job)
                        self._jobs.append(job)

    def array_groups(self) -> list[ArrayGroup]:
        """The plan's job arrays; a job in none of them is submitted on its own."""
        return []

    def cell(self, cell_id: str) -> CellConfig:
        return self._cells[cell_id]

    def has_cell(self, cell_id: str) -> bool:
        return cell_id in self._cells

    def jobs(self) -> Iterator[StageJob]:
        """Each stage job once, in an order where it comes after the jobs it depends on."""
        return iter(self._jobs)

    def users(self, job: StageJob) -> list[str]:
        """The cells whose tables this job's output feeds, in grid order."""
        return self._users[(job.stage, job.key)]

    def has_key(self, stage: str, key: str) -> bool:
        """Whether a cell of this plan runs `stage` under `key` (any repeat)."""
        return (stage, key) in self._users

    def spec_cell(self, job: StageJob) -> CellConfig:
        """The settings the job runs with: every user agrees on them (they share the key)."""
        return self._cells[self.users(job)[0]]

    def cell_jobs(self, cell_id: str, stage: str) -> list[StageJob]:
        """The jobs behind one cell's stage, one per repeat the cell asks for."""
        cell = self._cells[cell_id]
        return [StageJob(stage, self.keys[cell_id][stage], r) for r in range(cell.repeats.of(stage))]

    def upstream_keys(self, job: StageJob) -> dict[str, str]:
        """The outputs a job reads, by stage: the trained model, and for infer the index."""
        keys = self.keys[self.users(job)[0]]
        wanted = {"index": ("train",), "infer": ("train", "index")}.get(job.stage, ())
        return {stage: keys[stage] for stage in wanted if stage in keys}

    def inputs(self, job: StageJob) -> tuple[StageJob, ...]:
        """Every upstream job whose record this job's output is made from."""
        upstream = self.upstream_keys(job)
        jobs = []
        if "train" in upstream:
            jobs.append(StageJob("train", upstream["train"], 0))
        if "index" in upstream:
            jobs.append(StageJob("index", upstream["index"], SEARCHED_INDEX_REPEAT))
        return tuple(jobs)

    def dependencies(self, job: StageJob) -> tuple[StageJob, ...]:
        """The jobs that must finish first: index after train, infer after index repeat 0."""
        if job.stage == "index":
            return self.inputs(job)
        if job.stage == "infer":
            return tuple(j for j in self.inputs(job) if j.stage == "index")
        return ()

    def subset(self, cell_ids: list[str]) -> "Plan":
        """The plan of some of its cells (a --cell or --group selection): their jobs and keys,
        for reports of those cells alone. Never saved: plan.json always holds the whole grid."""
        wanted = set(cell_ids)
        return Plan(self.grid_name, tuple(c for c in self.cells if c.cell_id in wanted), {c: self.keys[c] for c in cell_ids})

    def to_json(self) -> dict[str, Any]:
        return {
            "grid": self.grid_name,
            "cells": [{**cell.to_json(), "keys": self.keys[cell.cell_id]} for cell in self.cells],
            "jobs": [
                {**job.to_json(), "cells": self.users(job), "depends_on": [dep.id for dep in self.dependencies(job)]}
                for job in self.jobs()
            ],
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> "Plan":
        cells = tuple(cell_from_json(c) for c in saved["cells"])
        return cls(saved["grid"], cells, {c["cell_id"]: dict(c["keys"]) for c in saved["cells"]})


def make_plan(grid: Grid, hashes: ContentHashes | None = None) -> Plan:
    hashes = hashes or ContentHashes(None)
    keys = {cell.cell_id: stage_keys(cell, hashes) for cell in grid.cells}
    hashes.save()
    return Plan(grid.name, grid.cells, keys)

