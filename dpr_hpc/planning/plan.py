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
from dpr_hpc.grid.config import SHARD_STAGES, cell_from_json
from dpr_hpc.planning.stage_keys import shard_of, slot, slot_order, stage_keys, stage_of

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
    # cell id -> slot -> key, in dependency order; a slot is a stage, or a shard stage with its
    # shard ("encode-shard#3", planning.stage_keys.slot)
    keys: dict[str, dict[str, str]]
    _cells: dict[str, CellConfig] = field(init=False, repr=False)
    _jobs: list[StageJob] = field(init=False, repr=False)
    _users: dict[tuple[str, str], list[str]] = field(init=False, repr=False)
    _slots: dict[tuple[str, str], str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys = {cell_id: dict(sorted(keys.items(), key=lambda item: slot_order(item[0]))) for cell_id, keys in self.keys.items()}
        self._cells = {cell.cell_id: cell for cell in self.cells}
        self._users = {}
        self._slots = {}
        repeats: dict[tuple[str, str], int] = {}
        for cell in self.cells:
            for name, key in self.keys[cell.cell_id].items():
                node = (stage_of(name), key)
                self._users.setdefault(node, []).append(cell.cell_id)
                self._slots.setdefault(node, name)
                repeats[node] = max(repeats.get(node, 0), cell.repeats.of(node[0]))
        seen: set[StageJob] = set()
        self._jobs = []
        for cell in self.cells:
            for name, key in self.keys[cell.cell_id].items():
                node = (stage_of(name), key)
                for repeat in range(repeats[node]):
                    job = StageJob(node[0], key, repeat)
                    if job not in seen:
                        seen.add(job)
                        self._jobs.append(job)

    def array_groups(self) -> list[ArrayGroup]:
        """The plan's job arrays, one per shard stage of each corpus evaluation: its shards in
        shard order, at most the corpus's `parallel` at once. A job in none of them is submitted
        on its own. Cells that share a corpus's shard jobs share their group."""
        groups: dict[tuple[StageJob, ...], ArrayGroup] = {}
        for cell in self.cells:
            if cell.corpus is None:
                continue
            for stage in SHARD_STAGES:
                jobs = tuple(self.cell_jobs(cell.cell_id, stage))
                if jobs not in groups:
                    groups[jobs] = ArrayGroup(f"{stage}/{jobs[0].key}", jobs, cell.corpus.array_parallel)
        return list(groups.values())

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
        """The jobs behind one cell's stage: one per repeat the cell asks for, or for a shard
        stage one per shard, in shard order."""
        cell = self._cells[cell_id]
        keys = [key for name, key in self.keys[cell_id].items() if stage_of(name) == stage]
        return [StageJob(stage, key, r) for key in keys for r in range(cell.repeats.of(stage))]

    def slot(self, job: StageJob) -> str:
        """The job's slot in its cells' keys: its stage, or its shard stage and shard."""
        return self._slots[(job.stage, job.key)]

    def upstream_keys(self, job: StageJob) -> dict[str, str]:
        """The outputs a job reads, by slot: the trained model; for infer the index; for a
        search shard its encoded shard; for the merge every search shard."""
        keys = self.keys[self.users(job)[0]]
        if job.stage == "search-shard":
            wanted: tuple[str, ...] = ("train", slot("encode-shard", shard_of(self.slot(job))))
        elif job.stage == "merge":
            wanted = tuple(name for name in keys if stage_of(name) == "search-shard")
        else:
            wanted = {"index": ("train",), "infer": ("train", "index"), "encode-shard": ("train",)}.get(job.stage, ())
        return {name: keys[name] for name in wanted if name in keys}

    def inputs(self, job: StageJob) -> tuple[StageJob, ...]:
        """Every upstream job whose record this job's output is made from."""
        return tuple(StageJob(stage_of(name), key, upstream_repeat(name)) for name, key in self.upstream_keys(job).items())

    def dependencies(self, job: StageJob) -> tuple[StageJob, ...]:
        """The jobs that must finish first: index and encode-shard after train, infer after
        index repeat 0, a search shard after its encoded shard, the merge after every search
        shard (an input that another input was made from is waited for through that one)."""
        inputs = self.inputs(job)
        if job.stage in ("infer", "search-shard"):
            return tuple(j for j in inputs if j.stage != "train")
        return inputs

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


def upstream_repeat(slot_name: str) -> int:
    """The repeat of an upstream stage that a job reads: the searched index repeat, else 0."""
    return SEARCHED_INDEX_REPEAT if stage_of(slot_name) == "index" else 0


def make_plan(grid: Grid, hashes: ContentHashes | None = None) -> Plan:
    hashes = hashes or ContentHashes(None)
    keys = {cell.cell_id: stage_keys(cell, hashes) for cell in grid.cells}
    hashes.save()
    return Plan(grid.name, grid.cells, keys)

