"""The report's parts that need no trained model: hardware variance, the terminal table, the
Markdown escaping, the JSON round trip, the TREC files and the cost from records alone."""

from __future__ import annotations

import pandas as pd
import pytest

from dpr_hpc.reporting.collect import RepeatRecords, markdown, read_table_json, terminal_table, write_table
from dpr_hpc.reporting.report import node_points, variance_rows
from dpr_hpc.scoring.trec import metrics_from_files, write_qrels, write_run
from dpr_hpc.scoring.metrics import retrieval_metrics


def timing_record(node: str, gpu: str, **timings: float) -> dict:
    return {"node": {"hostname": node, "slurm_node": node, "gpu_name": gpu}, "timings": timings}


def two_node_repeats() -> list[RepeatRecords]:
    """Four index and infer repeats of one cell on gpu01, and two more on gpu02, 3x slower."""
    repeats = []
    for repeat, (node, slow) in enumerate([("gpu01", 1.0)] * 4 + [("gpu02", 3.0)] * 2):
        repeats.append(RepeatRecords(
            "bert-es768", repeat,
            train=timing_record("gpu01", "A100", ttt_s=3600.0),
            index=timing_record(node, "A100" if node == "gpu01" else "V100", pei_s=100.0 * slow + repeat),
            infer=timing_record(node, "A100" if node == "gpu01" else "V100", ita_mean_ms=2.0 * slow),
        ))
    return repeats


def test_variance_flags_the_slow_nodes_repeats_and_the_figure_shows_both_nodes(tmp_path):
    from dpr_hpc.reporting.figures import node_variance

    variance = variance_rows(two_node_repeats(), factor=1.5)
    flagged = variance[variance["flagged"]]
    assert set(flagged["node"]) == {"gpu02"}
    assert sorted(zip(flagged["metric"], flagged["repeat"])) == [("ita_mean_ms", 4), ("ita_mean_ms", 5), ("pei_s", 4), ("pei_s", 5)]
    assert not variance[variance["node"] == "gpu01"]["flagged"].any()
    points = node_points(variance)
    assert [p.label.split("\n")[0] for p in points] == ["gpu01", "gpu02"]
    assert points[1].label.endswith("V100") and min(points[1].ratios["pei_s"]) > 2.5
    png = node_variance(points, 1.5, tmp_path / "variance.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_repeat_is_flagged_when_every_node_agrees():
    repeats = [RepeatRecords("c", r, None, timing_record("n1", "A100", pei_s=100.0 + r), None) for r in range(3)]
    assert not variance_rows(repeats, factor=1.5)["flagged"].any()


def wide_table() -> pd.DataFrame:
    return pd.DataFrame([{
        "cell_id": "facebook-dpr-question_encoder-single-nq-base-es768-eval-0123abcd", "group": "table4",
        "encoder": "facebook/dpr-question_encoder-single-nq-base | facebook/dpr-ctx_encoder-single-nq-base",
        "embedding_size": 768, "batch_size": None, "ttt_s": None, "pei_s": 12345.678, "ita_mean_ms": 3.21,
        "acc@1": 0.41, "acc@20": 0.78, "acc@100": 0.86, "mrr@100": 0.52, "train_node": None, "index_node": "gpu01", "infer_node": "gpu02",
    }])


@pytest.mark.parametrize("width", [80, 120])
def test_the_terminal_table_fits_its_width_and_says_what_it_left_out(width):
    printed = terminal_table(wide_table(), width)
    assert max(len(line) for line in printed.splitlines()) <= width
    assert printed.splitlines()[0].startswith("cell_id")
    assert "the files have every column" in printed


def test_chosen_columns_and_an_unknown_one():
    from dpr_hpc.errors import UsageError

    printed = terminal_table(wide_table(), 200, ["embedding_size", "mrr@100"])
    assert printed.splitlines()[0].split() == ["ES", "mrr@100"]
    with pytest.raises(UsageError, match="no column nope"):
        terminal_table(wide_table(), 200, ["nope"])


def test_markdown_escapes_a_pipe_inside_a_value_so_the_row_keeps_its_columns():
    lines = markdown(wide_table()).splitlines()
    header_cells = lines[0].count(" | ")
    assert lines[2].replace("\\|", "").count(" | ") == header_cells
    assert "single-nq-base \\| facebook" in lines[2]


def test_json_round_trips_with_its_schema_version(tmp_path):
    table = pd.concat([wide_table(), wide_table().assign(ttt_s=10.5, batch_size=16, encoder="bert")], ignore_index=True)
    table["batch_size"] = table["batch_size"].astype("float64")
    paths = write_table(table, tmp_path, "grid", ["csv", "md", "json"])
    assert [p.suffix for p in paths] == [".csv", ".md", ".json"]
    assert '"schema_version": 1' in paths[2].read_text()
    pd.testing.assert_frame_equal(read_table_json(paths[2]), table)


def test_metrics_recomputed_from_a_trec_run_file_equal_the_rankings(tmp_path):
    rankings = [["p3", "p1", "p1", "p2"], ["p9", "p8"], ["p5"]]
    scores = [[9.0, 8.0, 8.0, 7.0], [3.0, 2.0], [1.0]]
    gold = ["p1", "p7", "p5"]
    qids = ["q0", "q4", "q7"]
    write_run(tmp_path / "run.trec", qids, rankings, scores, "tag")
    write_qrels(tmp_path / "qrels.trec", qids, gold)
    assert (tmp_path / "run.trec").read_text().splitlines()[:3] == ["q0 Q0 p3 1 9.000000 tag", "q0 Q0 p1 2 8.000000 tag", "q0 Q0 p2 3 7.000000 tag"]
    assert metrics_from_files(tmp_path / "run.trec", tmp_path / "qrels.trec", 100) == pytest.approx(retrieval_metrics(rankings, gold, 100))


def test_sacct_accounting_is_read_from_one_call_with_the_steps_peak_rss(monkeypatch):
    from dpr_hpc.tracking import slurm_queue

    calls = []
    sacct_output = "\n".join([
        "81|COMPLETED|2026-11-26T10:38:00|2026-11-26T10:38:38|2026-11-26T10:38:50|00:00:12|01:02.500||2G|billing=1,cpu=2,mem=2G,node=1,gres/gpu=1|gpu01",
        "81.batch|COMPLETED|2026-11-26T10:38:38|2026-11-26T10:38:38|2026-11-26T10:38:50|00:00:12|00:00.010|12444K|||gpu01",
        "81.0|COMPLETED|2026-11-26T10:38:38|2026-11-26T10:38:39|2026-11-26T10:38:50|00:00:11|01:02.490|386080K|||gpu01",
        "82|PENDING|2026-11-26T10:39:00|Unknown|Unknown|00:00:00|00:00:00||2G|billing=1,cpu=1,node=1|None assigned",
    ])
    monkeypatch.setattr(slurm_queue, "_run", lambda command: calls.append(command) or sacct_output)
    found = slurm_queue.accounting(["81", "82"])
    assert len(calls) == 1 and "-j" in calls[0] and "81,82" in calls[0]
    done, pending = found["81"], found["82"]
    assert (done.queue_wait_s, done.elapsed_s, done.total_cpu_s) == (38.0, 12.0, 62.5)
    assert done.max_rss_mb == pytest.approx(386080 / 1024) and done.alloc_mem_mb == 2048.0
    assert (done.gpus, done.cpus) == (1, 2)
    assert pending.queue_wait_s is None and pending.max_rss_mb is None


def test_figure_1_draws_no_caption_of_its_own_so_the_html_report_shows_it_once(tmp_path, monkeypatch):
    """The note under Figure 1 is the report's text; drawn into the PNG as well, the HTML report
    showed it twice."""
    import numpy as np
    from matplotlib.figure import Figure

    from dpr_hpc.reporting.figures import token_lengths

    drawn: list[str] = []
    monkeypatch.setattr(Figure, "text", lambda self, x, y, s, *a, **k: drawn.append(s))
    png = token_lengths({"BERT": np.array([10, 20, 30, 256])}, 256, tmp_path / "f1.png", "Figure 1: passage token lengths")
    assert png.exists() and drawn == []
