"""collect, load_results and report: a grid's complete records as tables, a DataFrame and
the paper's report. pandas and matplotlib are imported on first use, not with the package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dpr_hpc.api.common import Names, Target, find_runs, selected_runs, selection_of

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class CollectedTable:
    """One run's table (per repeat, or per cell with `median`) and the files written from it.
    `table.attrs` holds the stage records left out (not complete) and the cells that left the grid."""

    grid: str
    table: "pd.DataFrame"
    files: list[Path]


def collect(target: Target = None, *, runs_root: "str | Path | None" = None, median: bool = False,
            out: "str | Path" = "results", formats: "str | Sequence[str]" = "csv,md", cells: Names = None,
            groups: Names = None, stages: Names = None) -> list[CollectedTable]:
    """Merge each run's complete records into one table and write it to OUT/<grid>[-median].<format>."""
    from dpr_hpc.reporting.collect import collect_table, parse_formats, write_table

    chosen = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    selection = selection_of(cells, groups, stages)
    collected = []
    for layout, plan in selected_runs(target, runs_root, selection):
        table = collect_table(layout, plan, median=median, selection=selection)
        stem = f"{plan.grid_name}-median" if median else plan.grid_name
        collected.append(CollectedTable(plan.grid_name, table, write_table(table, Path(out), stem, chosen)))
    return collected


def load_results(grid_or_run: "str | Path", median: bool = False, runs_root: "str | Path | None" = None) -> "pd.DataFrame":
    """Every complete record of a grid file's or run folder's cells, one row per cell and
    repeat (or per cell with `median=True`), with every recorded field flattened beside
    collect's columns (see dpr_hpc.reporting.frame)."""
    from dpr_hpc.reporting.frame import run_frame

    layout, plan = find_runs(grid_or_run, runs_root)[0]
    return run_frame(layout, plan, median)


def report(target: Target = None, *, runs_root: "str | Path | None" = None, out: "str | Path" = "results",
           baseline: str = "BERT-768", variance_factor: float = 1.5, html: bool = True, paper: bool = False,
           cells: Names = None, groups: Names = None, stages: Names = None) -> dict[str, list[Path]]:
    """The paper's tables and figures, hardware variance and cost of each run, in OUT/<grid>/;
    the files written, by grid."""
    from dpr_hpc.reporting.report import ReportOptions, write_report

    options = ReportOptions(baseline=baseline, variance_factor=variance_factor, html=html, paper=paper)
    selection = selection_of(cells, groups, stages)
    return {plan.grid_name: write_report(layout, plan, Path(out) / plan.grid_name, options, selection)
            for layout, plan in selected_runs(target, runs_root, selection)}
