"""The report, load_results, collect's formats and the TREC files on a real (short) run through
the local backend: one tiny BERT trained for 2 epochs with repeated timing stages, and the same
weights evaluated untrained. Quality is not the point here (test_end_to_end trains for real)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import trained_and_untrained_grid

pytestmark = pytest.mark.slow


def cli(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpr_hpc", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def demo_run(demo_assets, tmp_path_factory):
    work = tmp_path_factory.mktemp("report-e2e")
    grid = trained_and_untrained_grid(work, demo_assets, epochs=2, warmup_steps=5)
    first = cli("submit", grid, "--backend", "local", cwd=work)
    assert first.returncode == 0, first.stdout + first.stderr
    return work, grid, first


def test_collect_fits_an_80_column_terminal_and_writes_every_format(demo_run):
    work, grid, _ = demo_run
    done = cli("collect", grid, "--median", "--format", "csv,md,json", "--out", work / "results", cwd=work, env={"COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    assert max(len(line) for line in (done.stdout + done.stderr).splitlines()) <= 80
    from dpr_hpc.reporting.collect import read_table_json

    csv = pd.read_csv(work / "results" / "e2e-median.csv")
    saved = read_table_json(work / "results" / "e2e-median.json")
    assert list(saved.columns) == list(csv.columns) and len(saved) == len(csv) == 2
    pd.testing.assert_series_equal(saved["mrr@100"], csv["mrr@100"], check_exact=False)


def test_every_infer_stage_writes_a_trec_run_whose_metrics_equal_the_record(demo_run):
    from dpr_hpc.scoring.trec import metrics_from_files

    work, _, _ = demo_run
    infer_records = list(work.glob("runs/store/infer/*/*/result.json"))
    assert len(infer_records) == 4
    for result in infer_records:
        record = json.loads(result.read_text())
        attempt = result.parent / "attempts" / f"a{record['attempt']}"
        assert {"run.trec", "qrels.trec"} <= set(record["artifacts"])
        recomputed = metrics_from_files(attempt / "run.trec", attempt / "qrels.trec", 100)
        assert recomputed == pytest.approx({k: record["metrics"][k] for k in ("acc@1", "acc@20", "acc@100", "mrr@100")})
        first = (attempt / "run.trec").read_text().splitlines()[0].split()
        assert first[1] == "Q0" and first[3] == "1" and float(first[4]) != 0.0


def test_load_results_has_the_documented_columns(demo_run):
    import dpr_hpc
    from dpr_hpc.reporting.frame import DOCUMENTED_COLUMNS

    work, grid, _ = demo_run
    frame = dpr_hpc.load_results(grid, runs_root=work / "runs")
    assert set(DOCUMENTED_COLUMNS) <= set(frame.columns)
    assert len(frame) == 4 and frame["train.details.precision"].notna().sum() == 3
    median = dpr_hpc.load_results(grid, median=True, runs_root=work / "runs")
    assert len(median) == 2 and list(median["n_infer"]) == [3, 1]


def test_report_writes_markdown_figures_and_a_self_contained_html(demo_run):
    work, grid, _ = demo_run
    done = cli("report", grid, "--baseline", "BERT-64", "--out", work / "results", cwd=work)
    assert done.returncode == 0, done.stderr
    folder = work / "results" / "e2e"
    report = (folder / "report.md").read_text()
    for heading in ("Table 2", "Table 3", "Table 4", "Table 5", "Figure 1", "Figure 2", "Figure 5", "Hardware variance", "Cost"):
        assert f"## {heading}" in report
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["figure-ita.png", "figure-mrr100.png", "figure-pei.png", "figure-token-lengths.png", "figure-ttt.png", "variance.png"]
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs) and "src='figure" not in html
    assert "record: wall, RSS" in report  # the local backend: every cost figure from the records
