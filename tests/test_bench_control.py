"""The control-path benchmark runs (small sizes here; its figures come from `dpr-hpc bench --control-path`)."""

from __future__ import annotations

from dpr_hpc.bench.control_path import run_control_benchmark


def test_control_benchmark_plans_submits_and_reads_status_of_generated_grids():
    report = run_control_benchmark((5, 20), echo=lambda line: None)
    assert [(row["cells"], row["jobs"]) for row in report["rows"]] == [(5, 15), (20, 60)]
    assert all(row[phase] > 0 for row in report["rows"] for phase in ("plan_s", "submit_queued_s", "status_s"))
