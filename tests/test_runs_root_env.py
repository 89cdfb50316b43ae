"""`$DPR_HPC_RUNS`: the runs root every command and load_results use when --runs-root is not given."""

from __future__ import annotations

import json

from conftest import run_cli
from dpr_hpc import load_results
from test_backend_auto import complete_run


def test_submit_status_collect_and_load_results_find_the_runs_under_dpr_hpc_runs(cached_x_y, data_files, tmp_path, monkeypatch, capsys):
    layout, grid = complete_run(data_files, tmp_path / "scratch")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # ./runs, the default, is not where the runs are
    monkeypatch.setenv("DPR_HPC_RUNS", str(layout.runs_root))

    code, out, err = run_cli(capsys, "status", grid, "--json")
    assert code == 0, err
    assert [row["state"] for row in json.loads(out)[0]["rows"]] == ["COMPLETED"] * 3
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local")
    assert code == 0, out + err
    assert f"-> {layout.root} (local)" in out and "local: 0 ran, 3 already complete" in out
    code, out, err = run_cli(capsys, "collect", grid, "--out", tmp_path / "results", "--json")
    assert code == 0, err
    (row,) = json.loads(out)[0]["rows"]
    assert row["pei_s"] is not None  # its records were found, not just its cell listed
    frame = load_results(grid)
    assert len(frame) == 1 and frame["infer.key"].notna().all()  # the cell's records were found
    assert not (elsewhere / "runs").exists()
