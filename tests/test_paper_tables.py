"""The paper's published figures as data (dpr_hpc/paper_tables.csv), pinned against the paper's
own text, and `report --paper` putting them beside ours with the ratio."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from conftest import REPO, run_cli, write_grid
from dpr_hpc.grid import load_grid
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.planning.plan import make_plan
from dpr_hpc.reporting.published import TABLES_FILE, paper_figures
from dpr_hpc.store.bindings import save_plan
from test_status import complete

EXCERPT = REPO / "tests" / "golden" / "paper_tables.md"  # Tables 2-5 as the paper's text prints them
PAPER = REPO.parent / "shared" / "paper.md"  # the paper itself, where this checkout sits beside it
TABLE1_BATCH = {"BERT": 16, "DistilBERT": 64, "TinyBERT": 128, "ELECTRA": 64}


def printed_figures() -> set[tuple[int, str, int, str]]:
    """(table, encoder, ES, figure as printed) for every figure of the excerpt, read cell by cell."""
    figures = set()
    for block in EXCERPT.read_text().split("**Table ")[1:]:
        table = int(block[0])
        lines = [line for line in block.splitlines()[1:] if "\t" in line]
        encoder = ""
        for line in lines[1:]:  # lines[0] is the header
            cells = [re.sub(r"</?[biu]>", "", c).strip() for c in line.split("\t")]
            encoder = cells[0] or encoder
            first = 3 if table == 5 else 2  # Table 5 has a batch-size column before its figures
            figures |= {(table, encoder, int(cells[1]), value) for value in cells[first:]}
    return figures


def data_rows() -> list[dict]:
    with TABLES_FILE.open(newline="") as handle:
        return list(csv.DictReader(line for line in handle if not line.startswith("#")))


def test_every_figure_of_tables_2_to_5_is_in_the_data_file_and_nothing_else():
    as_data = set()
    for row in data_rows():
        encoder = "Our BERT" if row["table"] == "4" and row["encoder"] == "BERT" else row["encoder"]
        as_data.add((int(row["table"]), encoder, int(row["embedding_size"]), row["printed"]))
    assert as_data == printed_figures()
    assert len(data_rows()) == 22 * 4 + 22 * 4 + 2 * 4 + 9 * 5


def test_the_excerpt_is_the_papers_text_verbatim():
    if not PAPER.exists():
        pytest.skip(f"{PAPER} is not beside this checkout")
    paper = PAPER.read_text()
    for block in EXCERPT.read_text().strip().split("\n\n"):
        assert block in paper


def test_values_are_the_printed_figures_in_seconds_and_fractions():
    for row in data_rows():
        value, printed = float(row["value"]), row["printed"]
        if row["metric"] in ("ttt_s", "pei_s"):
            hours, minutes = printed.split(":")
            assert value == int(hours) * 3600 + int(minutes) * 60
        elif row["metric"].startswith("acc@"):
            assert value == pytest.approx(float(printed) / 100)
        else:
            assert value == pytest.approx(float(printed))
    bert = paper_figures()[("BERT", 768, 16)]
    assert (bert["pei_s"].printed, bert["pei_s"].value, bert["pei_s"].tables) == ("2:40", 9600.0, (2,))
    assert bert["acc@1"].tables == (3, 4, 5) and bert["mrr@100"].value == pytest.approx(0.502)
    assert paper_figures()[("Original DPR", 768, None)]["acc@1"].value == pytest.approx(0.504)


def test_table_5s_pei_column_holds_the_training_times_of_table_2():
    """The paper heads Table 5's last column PEI(h); its values are Table 2's TTT of the same
    cells, so the data file files them as TTT and says why."""
    table5 = {(r["encoder"], int(r["embedding_size"]), int(r["batch_size"])): r for r in data_rows() if r["table"] == "5" and r["metric"] == "ttt_s"}
    table2 = {(r["encoder"], int(r["embedding_size"]), r["metric"]): r["printed"] for r in data_rows() if r["table"] == "2"}
    for (encoder, size, batch), row in table5.items():
        if batch == TABLE1_BATCH[encoder]:
            assert row["printed"] == table2[encoder, size, "ttt_s"] != table2[encoder, size, "pei_s"]
        assert "PEI(h)" in row["note"]


def paper_grid_text(data: Path) -> str:
    """jobs/paper.yaml on this test's data files, with one cell the paper does not have."""
    text = (REPO / "jobs" / "paper.yaml").read_text()
    text = text.replace("../data/nq/biencoder-nq-train.json", str(data / "train.json"))
    text = text.replace("../data/nq/biencoder-nq-dev.json", str(data / "dev.json"))
    text = text.replace("../slurm_templates/", str(REPO / "slurm_templates") + "/")
    return text + "\n  - name: not-in-the-paper\n    encoder: bert-base-uncased\n    train: {batch_size: 32}\n    embedding_sizes: [768]\n"


def test_report_paper_shows_the_papers_figure_ours_and_the_ratio_per_cell(data_files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = write_grid(data_files, paper_grid_text(data_files), name="paper.yaml")
    plan = make_plan(load_grid(grid, require_data=False))
    layout = RunLayout(tmp_path / "runs" / "paper")
    save_plan(layout, plan, grid)
    bert = next(c for c in plan.cells if c.question_encoder == "bert-base-uncased" and c.embedding_size == 768 and c.batch_size == 16)
    timings = {"ttt_s": 26460.0, "pei_s": 4800.0, "ita_mean_ms": 3.45, "ita_sd_ms": 0.5, "encode_s": 1, "index_build_s": 1}
    metrics = {"acc@1": 0.3429, "acc@20": 0.8, "acc@100": 0.9, "mrr@100": 0.4518, "num_passages": 1, "num_questions": 1, "epoch_loss": [1.0]}
    for stage in ("train", "index", "infer"):
        for job in plan.cell_jobs(bert.cell_id, stage):
            complete(layout, plan, job, timings=timings, metrics=metrics)

    code, out, err = run_cli(capsys, "report", "--runs-root", tmp_path / "runs", "--out", tmp_path / "results", "--paper", "--no-html")
    assert code == 0, err
    report = (tmp_path / "results" / "paper" / "report.md").read_text()
    efficiency = report.split("## Beside the paper: efficiency")[1].split("## Beside the paper: retrieval")[0]
    retrieval = report.split("## Beside the paper: retrieval")[1]
    row = next(line for line in efficiency.splitlines() if bert.cell_id in line)
    assert "| 14:42 (T2/5) | 7:21 | 0.5x |" in row  # TTT (Table 5 prints it too): the paper's, ours, ours / the paper's
    assert "| 2:40 (T2) | 1:20 | 0.5x |" in row  # PEI
    assert "| 6.9 (T2) | 3.45 | 0.5x |" in row  # ITA
    row = next(line for line in retrieval.splitlines() if bert.cell_id in line)
    assert "| 38.1 (T3/4/5) | 34.3 | 0.9x |" in row and "| .502 (T3/4/5) | .452 | 0.9x |" in row
    other = next(c for c in plan.cells if c.batch_size == 32)
    row = next(line for line in efficiency.splitlines() if other.cell_id in line)
    assert row.count("not in the paper") == 3 and "missing" in row
    dpr = next(c for c in plan.cells if c.evaluate_only)
    row = next(line for line in retrieval.splitlines() if dpr.cell_id in line)
    assert row.startswith("| Original DPR |") and "| 50.4 (T4) | missing |" in row
