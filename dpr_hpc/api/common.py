"""What every service call starts from: the runs root, the runs a target names, and the
selection (--cell, --group, --stage) as keyword arguments."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Union

from dpr_hpc.planning.selection import Selection, parse_stages
from dpr_hpc.store.layout import RunLayout, runs_root_or_default

if TYPE_CHECKING:
    from dpr_hpc.planning.plan import Plan

# A progress line (what the command prints as it goes); the CLI prints it, a notebook may log or drop it.
Progress = Callable[[str], None]
# One name or several: `cells="bert*"` and `cells=["bert*", "electra*"]` both read as a user means them.
Names = Union[str, Iterable[str], None]
Target = Union[str, Path, None]


def quiet(_line: str) -> None:
    """The progress callback when none is given: Python callers see results, not chatter."""


def selection_of(cells: Names = None, groups: Names = None, stages: Names = None) -> Selection:
    """A Selection from keyword arguments: cell-id globs, group names and stages (a stage list
    may also be comma-separated, as `--stage train,index` is)."""
    return Selection(_names(cells), _names(groups), parse_stages(_names(stages)))


def find_runs(target: Target, runs_root: "str | Path | None") -> list[tuple[RunLayout, "Plan"]]:
    """The runs a grid file, a run folder or (None) the whole runs root names, with their plans."""
    from dpr_hpc.store.runs import runs_for

    return runs_for(target, runs_root_or_default(runs_root))


def selected_runs(target: Target, runs_root: "str | Path | None", selection: Selection) -> list[tuple[RunLayout, "Plan"]]:
    """The runs a command acts on that hold a selected job (every run without a selection)."""
    runs = find_runs(target, runs_root)
    selected = selection.apply([plan for _, plan in runs])
    return [run for run, jobs in zip(runs, selected) if jobs]


def _names(value: Names) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        return (str(value),)
    return tuple(str(v) for v in value)
