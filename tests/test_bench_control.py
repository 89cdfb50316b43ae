"""The control-path benchmark times the real commands (small sizes here; its figures come from
`dpr-hpc bench --control-path`): no timed assertion, only that each command ran and did what it is
timed for, and that the report has the shape the lead's comparison reads."""

from __future__ import annotations

import json

from dpr_hpc.bench.control_path import COMMANDS, run_control_benchmark


def test_control_benchmark_runs_each_command_on_generated_grids_and_reports_growth(demo_assets):
    lines: list[str] = []
    report = run_control_benchmark((2, 4), echo=lines.append, demo=demo_assets)
    assert [(row["cells"], row["jobs"]) for row in report["rows"]] == [(2, 6), (4, 12)]
    assert all(row[phase] > 0 for row in report["rows"] for phase in (*COMMANDS, "first_plan_s", "setup_s"))
    assert report["cells_ratio"] == 2 and set(report["growth"]) == set(COMMANDS) == set(report["ms_per_cell"])
    assert report["goal"]["cells"] == 4 and isinstance(report["goal"]["met"], bool)
    assert "fake squeue/sacct" in report["scheduler"]
    assert len(lines) == 3 and lines[-1].startswith("growth 2 -> 4 cells")
    json.dumps(report)  # written as the JSON report as it is


def test_the_commands_timed_are_the_code_asked_for_whatever_the_working_directory(demo_assets, tmp_path, monkeypatch):
    """`--code DIR` times DIR's commands: `python -m` would put the harness's working directory
    (another checkout) first on sys.path, so the commands run in their grid's folder."""
    import shutil
    from pathlib import Path

    import dpr_hpc

    other = tmp_path / "other-checkout"
    shutil.copytree(Path(dpr_hpc.__file__).parent, other / "dpr_hpc")
    monkeypatch.chdir(Path(dpr_hpc.__file__).parents[1])  # run from this checkout, as `cd repo && bench` does
    report = run_control_benchmark((2, 3), echo=lambda line: None, demo=demo_assets, code=other)
    assert report["imports_from"] == str(other / "dpr_hpc" / "__init__.py")


def test_a_command_that_does_not_do_its_work_stops_the_benchmark(demo_assets, tmp_path, monkeypatch):
    """A figure is never the time of a command that failed early: here the grid's data file is
    missing, so the set-up submit fails and the benchmark says which step and why."""
    import pytest

    from dpr_hpc.bench import control_path

    real_grid = control_path._grid
    monkeypatch.setattr(control_path, "_grid", lambda folder, cells, demo: real_grid(folder, cells, tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="did not do what it is timed for"):
        run_control_benchmark((2, 4), echo=lambda line: None, demo=demo_assets)
