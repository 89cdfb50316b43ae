"""The paper's timing protocol as settings (issue 23): padding to max_length, an index of every
pool entry scored row by row, 1,000-row FAISS adds, tokenization inside PEI and result fetching
inside ITA. Each is validated at the grid's edge, enters the stage keys it changes, and is
named in the records; jobs/paper.yaml sets them the paper's way and jobs/paper-fast.yaml ours."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from conftest import REPO, cli, run_cli, write_grid
from dpr_hpc.grid import load_grid
from dpr_hpc.grid.config import IndexConfig, TextConfig, TimingConfig
from dpr_hpc.planning.plan import StageJob, make_plan

# The settings in which jobs/paper.yaml and jobs/paper-fast.yaml differ: the README's Fidelity
# rows for padding, precision, de-duplication, FAISS add batches and the PEI and ITA boundaries.
# (the paper's value, our fast value) per setting.
DIFFERENCES = {
    ("text", "padding"): ("max_length", "longest"),
    ("index", "deduplicate"): (False, True),
    ("index", "add_batch_size"): (1000, 8192),
    ("timing", "pei_includes_tokenization"): (True, False),
    ("timing", "ita_includes_fetch"): (True, False),
    ("precision", "train"): ("fp16", "auto"),
    ("precision", "encode"): ("fp32", "auto"),
}


def settings_of(cell) -> dict:
    """Everything a cell runs with, as its record states it, less its id."""
    record = cell.to_json()
    record.pop("cell_id")
    return record


def test_paper_and_paper_fast_plan_the_same_28_cells_differing_only_in_the_documented_settings(tmp_path):
    paper, fast = (load_grid(REPO / "jobs" / name, require_data=False) for name in ("paper.yaml", "paper-fast.yaml"))
    assert len(paper.cells) == len(fast.cells) == 28
    for slow_cell, fast_cell in zip(paper.cells, fast.cells):
        slow, quick = settings_of(slow_cell), settings_of(fast_cell)
        for (section, key), (paper_value, fast_value) in DIFFERENCES.items():
            assert (slow[section][key], quick[section][key]) == (paper_value, fast_value), (slow_cell.cell_id, section, key)
            slow[section].pop(key)
            quick[section].pop(key)
        assert slow == quick, slow_cell.cell_id
    assert paper.slurm_profile == fast.slurm_profile
    # As a user sees it: both plan 28 cells.
    for name in ("paper.yaml", "paper-fast.yaml"):
        done = cli("plan", REPO / "jobs" / name, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "28 cells" in done.stdout, done.stdout


GRID = """\
    name: keys
    data: {{train: {demo}/train.json, dev: {demo}/dev.json}}
    defaults:
      text: {{max_length: 64{text}}}
      index: {{type: flat{index}}}
      {extra}
    blocks:
      - {{name: b, encoder: {demo}/models/tiny-bert, embedding_sizes: [32]}}
"""


def keys_of(tmp_path: Path, demo: Path, text: str = "", index: str = "", extra: str = "") -> dict[str, str]:
    grid = write_grid(tmp_path, GRID.format(demo=demo, text=text, index=index, extra=extra), "keys.yaml")
    plan = make_plan(load_grid(grid))
    return plan.keys[plan.cells[0].cell_id]


@pytest.mark.parametrize("setting, changed", [
    ({"text": ", padding: max_length"}, {"train", "index", "infer"}),
    ({"index": ", deduplicate: false"}, {"index", "infer"}),
    ({"index": ", add_batch_size: 1000"}, {"index", "infer"}),
    ({"extra": "timing: {pei_includes_tokenization: true}"}, {"index", "infer"}),
    ({"extra": "timing: {ita_includes_fetch: true}"}, {"infer"}),
])
def test_each_protocol_setting_changes_the_stage_keys_it_changes(tmp_path, demo_assets, setting, changed):
    ours = keys_of(tmp_path, demo_assets)
    theirs = keys_of(tmp_path, demo_assets, **setting)
    assert {stage for stage in ours if ours[stage] != theirs[stage]} == changed


def test_the_protocol_settings_at_their_defaults_leave_cell_ids_and_stage_keys_as_they_were(tmp_path, demo_assets):
    """Written out at our defaults, the new settings change nothing: existing outputs stand."""
    defaults = dict(text=", padding: longest", index=", deduplicate: true, add_batch_size: 8192",
                    extra="timing: {pei_includes_tokenization: false, ita_includes_fetch: false}")
    assert keys_of(tmp_path, demo_assets, **defaults) == keys_of(tmp_path, demo_assets)
    assert TextConfig().identity() == {"max_length": 256, "embed_title": True, "passage_format": "paper"}
    assert "deduplicate" not in IndexConfig().identity() and "add_batch_size" not in IndexConfig().identity()


@pytest.mark.parametrize("text, key, expected", [
    ("text: {padding: max}", "defaults.text.padding", "one of longest, max_length"),
    ("index: {deduplicate: no_thanks}", "defaults.index.deduplicate", "expected true or false"),
    ("index: {add_batch_size: 0}", "defaults.index.add_batch_size", "a positive number of rows per FAISS add call"),
    ("timing: {pei_includes_tokenization: 1}", "defaults.timing.pei_includes_tokenization", "expected true or false"),
    ("timing: {ita_include_fetch: true}", "defaults.timing.ita_include_fetch", "did you mean 'ita_includes_fetch'"),
])
def test_a_bad_protocol_setting_is_one_clear_error_naming_the_file_and_key(tmp_path, data_files, capsys, text, key, expected):
    grid = write_grid(data_files, f"name: g\ndata: {{train: train.json, dev: dev.json}}\ndefaults:\n  {text}\n"
                                  "blocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    code, out, err = run_cli(capsys, "plan", grid)
    assert code != 0 and "Traceback" not in err
    assert str(grid) in err and key in err and expected in err, err


def test_a_records_cell_reads_back_with_its_protocol_settings():
    from dpr_hpc.grid.config import cell_from_json

    cell = load_grid(REPO / "jobs" / "paper.yaml", require_data=False).cells[0]
    again = cell_from_json(json.loads(json.dumps(cell.to_json())))
    assert again == cell and again.timing == TimingConfig(True, True) and again.text.pad_to == 256


# --- Acceptance: one demo cell with every paper setting, checked from its records and files ---

PAPER_CELL = """\
    name: paper-protocol
    data: {{train: {demo}/train.json, dev: {demo}/dev.json}}
    defaults:
      train: {{epochs: 1, batch_size: 16, learning_rate: 1.0e-3, dropout: 0.0, warmup_steps: 5, seed: 7}}
      text: {{max_length: 64, padding: max_length}}
      precision: {{train: fp16, encode: fp32}}
      index: {{deduplicate: false, add_batch_size: 1000}}
      timing: {{pei_includes_tokenization: true, ita_includes_fetch: true}}
      encode_batch_size: 128
    blocks:
      - {{name: bert, encoder: {demo}/models/tiny-bert, embedding_sizes: [64]}}
"""


@pytest.fixture(scope="module")
def paper_cell_run(demo_assets, tmp_path_factory):
    """The cell submitted through the local backend, as a user runs it."""
    from dpr_hpc.store.layout import RunLayout
    from dpr_hpc.store.records import Records
    from dpr_hpc.store.bindings import load_plan

    work = tmp_path_factory.mktemp("paper-protocol")
    grid = write_grid(work, PAPER_CELL.format(demo=demo_assets))
    done = cli("submit", grid, "--backend", "local", cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    layout = RunLayout.for_grid("paper-protocol", work / "runs")
    plan = load_plan(layout)
    keys = plan.keys[plan.cells[0].cell_id]
    records = Records(layout.store)
    jobs = {stage: StageJob(stage, key, 0) for stage, key in keys.items()}
    return ({stage: records.check(job).record for stage, job in jobs.items()},
            {stage: records.attempt_of(job) for stage, job in jobs.items()})


def dev_gold_and_pool(dev_file: Path) -> tuple[list[str], list[str]]:
    """Read from the dev file as the paper's code did: each question's first positive's id, and
    every pool entry's id (first positive, hard negatives, plain negatives), duplicates kept."""
    gold, pool = [], []
    for record in json.loads(dev_file.read_text()):
        contexts = record["positive_ctxs"][:1] + record.get("hard_negative_ctxs", []) + record.get("negative_ctxs", [])
        gold.append(str(record["positive_ctxs"][0]["passage_id"]))
        pool.extend(str(c["passage_id"]) for c in contexts)
    return gold, pool


@pytest.mark.slow
def test_the_paper_cell_indexes_every_pool_entry_576_rows_of_338_passages(paper_cell_run, demo_assets):
    records, attempts = paper_cell_run
    _, pool = dev_gold_and_pool(demo_assets / "dev.json")
    assert (len(pool), len(set(pool))) == (576, 338)
    index = faiss.read_index(str(attempts["index"].index_file))
    ids = [i.decode() for i in np.load(attempts["index"].passage_ids)]
    assert index.ntotal == len(ids) == 576 and ids == pool  # every entry its own row, in file order
    assert records["index"]["metrics"]["num_passages"] == 576 and records["index"]["metrics"]["distinct_passages"] == 338
    details = records["index"]["details"]
    assert details["deduplicate"] is False and details["index_add_batch_size"] == 1000 and details["index_add_calls"] == 1


@pytest.mark.slow
def test_the_paper_cells_pei_includes_its_tokenization(paper_cell_run):
    records, _ = paper_cell_run
    timings, details = records["index"]["timings"], records["index"]["details"]
    assert details["pei_includes_tokenization"] is True and details["tokens_cached"] is False
    assert timings["tokenize_s"] > 0
    assert timings["pei_s"] == pytest.approx(timings["tokenize_s"] + timings["encode_s"] + timings["index_build_s"])
    for stage in ("train", "index", "infer"):
        assert records[stage]["details"]["padding"] == "max_length" and records[stage]["details"]["pad_to"] == 64
    assert records["infer"]["details"]["ita_includes_fetch"] is True and records["infer"]["details"]["ranked_by"] == "row"


@pytest.mark.slow
def test_the_paper_cells_acc_and_mrr_equal_a_count_over_its_ranked_rows(paper_cell_run, demo_assets):
    """Counted here the way the paper's calculate_accuracy_mrr did, row by row over the 100
    rows of each question (not by dpr_hpc.scoring.metrics)."""
    records, attempts = paper_cell_run
    gold, _ = dev_gold_and_pool(demo_assets / "dev.json")
    ids = [i.decode() for i in np.load(attempts["index"].passage_ids)]
    rows = np.load(attempts["infer"].rankings)
    assert rows.shape == (len(gold), 100)
    ranked = [[ids[j] for j in row if j >= 0] for row in rows]
    hits = {1: 0, 20: 0, 100: 0}
    reciprocal = 0.0
    pushed_down = 0  # questions where a duplicate row above the gold moved it down
    for passages, answer in zip(ranked, gold):
        for k in hits:
            hits[k] += answer in passages[:k]
        if answer in passages:
            position = passages.index(answer)
            reciprocal += 1 / (position + 1)
            pushed_down += len(set(passages[:position])) < position
    metrics = records["infer"]["metrics"]
    n = len(gold)
    assert metrics["acc@1"] == pytest.approx(hits[1] / n)
    assert metrics["acc@20"] == pytest.approx(hits[20] / n)
    assert metrics["acc@100"] == pytest.approx(hits[100] / n)
    assert metrics["mrr@100"] == pytest.approx(reciprocal / n)
    assert pushed_down > 0  # so the count above differs from one over distinct passages
