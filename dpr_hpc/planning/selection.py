"""What a command acts on: every cell and stage of a grid, or the part picked by
`--cell PATTERN` (a shell glob on cell ids, repeatable), `--group NAME` (a block of the grid
file, by its `name:`; repeatable) and `--stage train|index|infer` (or a corpus stage,
encode-shard|search-shard|merge; repeatable, or a comma list). A shard stage selects every shard.

Patterns of one flag add up; the flags narrow each other: `--cell 'tiny-bert*' --stage infer`
is the infer repeats of the cells whose id starts with tiny-bert. A stage job is selected when
a selected cell uses it in a selected stage; a job that several cells share is selected when
any of them is. A pattern or group that picks nothing is a usage error naming it, never an
empty result that reads as "nothing to do".
"""

from __future__ import annotations

import argparse
import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from dpr_hpc.errors import UsageError
from dpr_hpc.grid.config import ALL_STAGES

STAGES = ALL_STAGES  # what --stage accepts: the dev-pool stages, then the corpus stages

if TYPE_CHECKING:  # the command line builds its parser from this module without loading the plan
    from dpr_hpc.planning.plan import Plan, StageJob

# How many cell ids an error lists before "and N more".
LISTED_IDS = 5


@dataclass(frozen=True)
class Selection:
    cell_patterns: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Selection":
        return cls(tuple(args.cell or ()), tuple(args.group or ()), parse_stages(args.stage or ()))

    @property
    def everything(self) -> bool:
        return not (self.cell_patterns or self.groups or self.stages)

    def describe(self) -> str:
        """The selection as the flags that made it, for messages."""
        flags = [f"--cell '{p}'" for p in self.cell_patterns] + [f"--group {g}" for g in self.groups]
        flags += [f"--stage {','.join(self.stages)}"] if self.stages else []
        return " ".join(flags) or "every cell and stage"

    def picks_stage(self, stage: str) -> bool:
        return not self.stages or stage in self.stages

    def cell_ids(self, plan: Plan) -> list[str]:
        """The plan's selected cells, in grid order (patterns that match nothing are not checked
        here: `apply` checks them over every run a command acts on)."""
        return [c.cell_id for c in plan.cells if self._picks_cell(c.cell_id, c.group)]

    def jobs(self, plan: Plan) -> list[StageJob]:
        """The selected stage jobs, each once, in the plan's dependency order."""
        picked = {job for cell_id in self.cell_ids(plan) for stage in plan.cell(cell_id).stages if self.picks_stage(stage)
                  for job in plan.cell_jobs(cell_id, stage)}
        return [job for job in plan.jobs() if job in picked]

    def apply(self, plans: Sequence[Plan]) -> list[list[StageJob]]:
        """The selected jobs of each plan; a UsageError when a pattern, group or stage picks
        nothing in any of them."""
        self._check_matches(plans)
        selected = [self.jobs(plan) for plan in plans]
        if not any(selected):
            cells = sorted({cell_id for plan in plans for cell_id in self.cell_ids(plan)})
            raise UsageError(f"{self.describe()}: the selected cells ({_listed(cells)}) have no such stage "
                             "(an evaluation-only cell has no train)")
        return selected

    def _picks_cell(self, cell_id: str, group: str) -> bool:
        by_id = not self.cell_patterns or any(fnmatch.fnmatchcase(cell_id, p) for p in self.cell_patterns)
        by_group = not self.groups or group in self.groups
        return by_id and by_group

    def _check_matches(self, plans: Sequence[Plan]) -> None:
        cells = [cell for plan in plans for cell in plan.cells]
        for pattern in self.cell_patterns:
            if not any(fnmatch.fnmatchcase(cell.cell_id, pattern) for cell in cells):
                raise UsageError(f"--cell '{pattern}' matches no cell; cells here: {_listed(c.cell_id for c in cells)}")
        for group in self.groups:
            if not any(cell.group == group for cell in cells):
                raise UsageError(f"--group {group}: no block of that name; blocks here: {_listed(c.group for c in cells)}")
        if not any(self._picks_cell(cell.cell_id, cell.group) for cell in cells):
            raise UsageError(f"{self.describe()}: no cell is picked by all of these together")


def parse_stages(values: Iterable[str]) -> tuple[str, ...]:
    """`--stage index --stage infer` or `--stage index,infer` -> ("index", "infer")."""
    stages = [s.strip() for value in values for s in value.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UsageError(f"--stage {unknown[0]}: expected one of {', '.join(STAGES)} (repeatable, or a comma list)")
    return tuple(dict.fromkeys(stages))


def add_selection_flags(parser: argparse.ArgumentParser, note: str) -> None:
    """The three flags every command that acts on a grid's cells takes, in a help section of
    their own; `note` says what a selection means for this command."""
    group = parser.add_argument_group("selection", "act on part of the grid; flags narrow each other, values of one flag add up. " + note)
    group.add_argument("--cell", action="append", default=[], metavar="PATTERN",
                       help="only the cells whose id matches this shell glob (quote it: 'tiny-bert*'); repeatable")
    group.add_argument("--group", action="append", default=[], metavar="NAME",
                       help="only the cells of this block of the grid file (its name:); repeatable")
    group.add_argument("--stage", action="append", default=[], metavar="STAGE",
                       help="only these stages: train, index, infer, or a corpus's encode-shard, search-shard, merge "
                            "(repeatable, or a comma list)")


def _listed(ids: Iterable[str]) -> str:
    unique = list(dict.fromkeys(ids))
    more = f" and {len(unique) - LISTED_IDS} more" if len(unique) > LISTED_IDS else ""
    return ", ".join(unique[:LISTED_IDS]) + more
