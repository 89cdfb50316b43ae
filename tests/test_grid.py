"""The grid file: what it expands to, how cells are named, and how bad input is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO, run_cli, write_grid
from dpr_hpc.errors import GridError
from dpr_hpc.grid import load_grid
from dpr_hpc.grid.config import cell_from_json
from dpr_hpc.planning.plan import StageJob, make_plan

TABLE_1 = {
    "bert-base-uncased": ({1536, 768, 704, 640, 512, 384}, 16),
    "distilbert-base-uncased": ({1536, 768, 704, 640, 512, 384}, 64),
    "huawei-noah/TinyBERT_General_4L_312D": ({1536, 768, 512, 384, 312}, 128),
    "google/electra-small-discriminator": ({1536, 768, 512, 384, 256}, 64),
}
# Table 5 rows that Table 1 does not already hold: (encoder, embedding size, batch size).
TABLE_5_EXTRA = {
    ("bert-base-uncased", 768, 8),
    ("distilbert-base-uncased", 768, 16),
    ("huawei-noah/TinyBERT_General_4L_312D", 312, 64),
    ("huawei-noah/TinyBERT_General_4L_312D", 312, 16),
    ("google/electra-small-discriminator", 256, 16),
}


def paper_plan(capsys) -> dict:
    code, out, _ = run_cli(capsys, "plan", REPO / "jobs" / "paper.yaml", "--json")
    assert code == 0
    return json.loads(out)


def test_paper_grid_lists_exactly_the_papers_cells(capsys):
    cells = paper_plan(capsys)["cells"]
    trained = {(c["question_encoder"], c["embedding_size"], c["train"]["batch_size"]) for c in cells if c["train"]}
    table_1 = {(enc, size, batch) for enc, (sizes, batch) in TABLE_1.items() for size in sizes}
    assert len(table_1) == 22
    assert trained == table_1 | TABLE_5_EXTRA
    evaluation_only = [c for c in cells if c["train"] is None]
    assert [(c["question_encoder"], c["passage_encoder"], c["embedding_size"]) for c in evaluation_only] == [
        ("facebook/dpr-question_encoder-single-nq-base", "facebook/dpr-ctx_encoder-single-nq-base", 768)
    ]
    assert len(cells) == 22 + 5 + 1


def test_paper_grid_repeats_bert_and_distilbert_768_five_times(capsys):
    plan = paper_plan(capsys)
    repeated = {(c["question_encoder"], c["embedding_size"], c["train"]["batch_size"]) for c in plan["cells"] if c["repeats"] == {"index": 5, "infer": 5}}
    assert repeated == {("bert-base-uncased", 768, 16), ("distilbert-base-uncased", 768, 64)}
    per_stage = Counter(job["stage"] for job in plan["jobs"])
    assert per_stage == {"train": 27, "index": 28 + 8, "infer": 28 + 8}


def test_paper_defaults_are_the_papers_hyperparameters():
    cell = load_grid(REPO / "jobs" / "paper.yaml", require_data=False).cells[0]
    assert (cell.train.epochs, cell.train.learning_rate, cell.train.warmup_steps, cell.train.dropout) == (40, 1e-5, 100, 0.1)
    assert (cell.index.type, cell.index.hnsw_m, cell.index.ef_construction, cell.index.ef_search) == ("hnsw_flat", 512, 200, 128)
    assert (cell.text.max_length, cell.text.embed_title, cell.encode_batch_size, cell.top_k) == (256, True, 512, 100)
    # What the paper's code ran (experiments/train_dpr.py), beyond the paper's text.
    assert (cell.train.weight_decay, cell.train.max_grad_norm, cell.train.lr_floor, cell.train.seed) == (0.01, 0.0, 1e-7, 1234)
    assert (cell.train.hard_negative, cell.text.passage_format) == ("first", "paper")
    assert (cell.precision.train, cell.precision.encode) == ("fp16", "fp32")


def test_original_dpr_cell_encodes_passages_as_the_papers_evaluation_did():
    """The paper's log shows DPR's towers fed through evaluate_dpr.py's own pipeline ("title
    text", one segment), not DPR's format: Table 4's cell reproduces that."""
    cells = load_grid(REPO / "jobs" / "paper.yaml", require_data=False).cells
    assert [c.text.passage_format for c in cells if c.evaluate_only] == ["paper"]
    assert {c.text.passage_format for c in cells if not c.evaluate_only} == {"paper"}


def test_gradcache_grid_offers_dprs_nq_recipe_beside_the_papers_settings():
    cells = load_grid(REPO / "jobs" / "paper-gradcache.yaml", require_data=False).cells
    recipe = [c for c in cells if c.group == "dpr-recipe-bert"]
    assert len(recipe) == 1 and recipe[0].train.batch_size == 128
    dpr = recipe[0].train
    assert (dpr.learning_rate, dpr.warmup_steps, dpr.hard_negative, dpr.weight_decay, dpr.max_grad_norm, dpr.lr_floor, dpr.seed) == (
        2e-5, 1237, "shuffle", 0.0, 2.0, 0.0, 12345)
    assert recipe[0].text.passage_format == "dpr"
    paper = {(c.train.learning_rate, c.train.warmup_steps, c.train.hard_negative) for c in cells if c.group != "dpr-recipe-bert"}
    assert paper == {(1e-5, 100, "first")}


def test_issue_12_settings_round_trip_and_enter_the_cell_id(tmp_path, data_files):
    body = """
        name: g
        data: {{train: train.json, dev: dev.json}}
        blocks:
          - name: b
            encoder: bert-base-uncased
            embedding_sizes: [64]
            {setting}
    """
    settings = {
        "default": "repeats: {index: 1}",
        "dpr format": "text: {passage_format: dpr}",
        "shuffle": "train: {hard_negative: shuffle}",
        "floor": "train: {lr_floor: 0.0}",
        "clipping": "train: {max_grad_norm: 2.0}",
        "encode precision": "precision: {encode: fp32}",
    }
    cells = {}
    for key, setting in settings.items():
        path = write_grid(data_files, body.format(setting=setting), f"{key.replace(' ', '-')}.yaml")
        cells[key] = load_grid(path).cells[0]
    assert len({c.cell_id for c in cells.values()}) == len(settings)
    for cell in cells.values():
        assert cell_from_json(json.loads(json.dumps(cell.to_json()))) == cell


def test_stages_depend_on_train_then_index_repeat_zero():
    grid = load_grid(REPO / "jobs" / "paper.yaml", require_data=False)
    plan = make_plan(grid)
    trained = grid.cells[5]  # BERT 768, five repeats
    train, index3, infer4 = (plan.cell_jobs(trained.cell_id, stage)[-1 if stage != "train" else 0] for stage in ("train", "index", "infer"))
    assert (index3.repeat, infer4.repeat) == (4, 4)
    assert plan.dependencies(index3) == (train,)
    assert plan.dependencies(infer4) == (plan.cell_jobs(trained.cell_id, "index")[0],)
    assert plan.inputs(infer4) == (train, plan.cell_jobs(trained.cell_id, "index")[0])  # reads the question encoder too
    original_dpr = grid.cells[-1]
    assert plan.dependencies(plan.cell_jobs(original_dpr.cell_id, "index")[0]) == ()
    jobs = list(plan.jobs())
    assert all(jobs.index(dep) < jobs.index(job) for job in jobs for dep in plan.dependencies(job))


def test_cell_ids_are_readable_and_stable():
    cells = load_grid(REPO / "jobs" / "paper.yaml", require_data=False).cells
    # Pinned: the same config must give the same id on any machine, any day.
    # Issue 12 changed the paper grid's settings (fp16/fp32 precision, the paper's optimiser), so a new id;
    # issue 23 gave it the paper's timing protocol (padding, pool, add batches, timers), so another.
    assert cells[5].cell_id == "bert-base-uncased-es768-bs16-0ed19f68"
    assert cells[-1].cell_id.startswith("dpr-question_encoder-single-nq-base-es768-eval-")
    assert len({c.cell_id for c in cells}) == len(cells)


def test_cell_id_ignores_group_and_repeats_but_not_settings(tmp_path, data_files):
    base = """
        name: g
        data: {{train: train.json, dev: dev.json}}
        blocks:
          - name: {group}
            encoder: bert-base-uncased
            embedding_sizes: [64]
            repeats: {{index: {repeats}}}
            train: {{learning_rate: {lr}}}
            checkpoint: {{every_minutes: {minutes}}}
    """
    ids = {}
    cases = {"a": ("x", 1, "1.0e-5", 30), "b": ("y", 3, "1.0e-5", 5), "c": ("x", 1, "2.0e-5", 30)}
    for key, (group, repeats, lr, minutes) in cases.items():
        path = write_grid(data_files, base.format(group=group, repeats=repeats, lr=lr, minutes=minutes), f"{key}.yaml")
        ids[key] = load_grid(path).cells[0].cell_id
    assert ids["a"] == ids["b"]  # group, repeats and checkpoint intervals change no result
    assert ids["a"] != ids["c"]


def test_block_and_cell_overrides_merge_over_defaults(tmp_path, data_files):
    path = write_grid(data_files, """
        name: g
        data: {train: train.json, dev: dev.json}
        defaults: {train: {epochs: 3, batch_size: 4}, index: {type: flat}}
        blocks:
          - name: b
            encoder: bert-base-uncased
            train: {batch_size: 8}
            embedding_sizes: [32]
            cells:
              - {embedding_size: 16, train: {epochs: 5}, encoder: distilbert-base-uncased}
    """)
    first, second = load_grid(path).cells
    assert (first.train.epochs, first.train.batch_size, first.index.type, first.question_encoder) == (3, 8, "flat", "bert-base-uncased")
    assert (second.train.epochs, second.train.batch_size, second.question_encoder) == (5, 8, "distilbert-base-uncased")


def test_auto_batch_size_and_gradient_cache_are_part_of_the_cell(tmp_path, data_files):
    path = write_grid(data_files, """
        name: g
        data: {train: train.json, dev: dev.json}
        blocks:
          - {name: auto, encoder: bert-base-uncased, train: {batch_size: auto}, embedding_sizes: [64]}
          - {name: plain, encoder: bert-base-uncased, train: {batch_size: 128}, embedding_sizes: [64]}
          - {name: cached, encoder: bert-base-uncased, train: {batch_size: 128}, grad_cache: {chunk_size: 16}, embedding_sizes: [64]}
    """)
    auto, plain, cached = load_grid(path).cells
    assert auto.batch_size == "auto" and "-bsauto-" in auto.cell_id
    assert cached.grad_cache.chunk_size == 16 and plain.grad_cache.chunk_size == 0
    assert cached.cell_id != plain.cell_id  # the cache changes the training's timings


VALID_BLOCK = "  - name: b\n    encoder: bert-base-uncased\n    embedding_sizes: [64]\n"
MALFORMED = {
    "unknown key": ("blocks:\n  - name: b\n    encoder: bert-base-uncased\n    embedding_size: [64]\n", "blocks[0].embedding_size", "did you mean 'embedding_sizes'"),
    "unknown nested key": ("defaults: {train: {learning_rat: 0.1}}\nblocks:\n" + VALID_BLOCK, "defaults.train.learning_rat", "did you mean 'learning_rate'"),
    "wrong type": ("defaults: {train: {epochs: many}}\nblocks:\n" + VALID_BLOCK, "defaults.train.epochs", "expected an integer"),
    "negative size": ("blocks:\n  - name: b\n    encoder: bert-base-uncased\n    embedding_sizes: [64, -5]\n", "blocks[0].embedding_sizes[1]", "positive integer"),
    "zero size": ("blocks:\n  - name: b\n    encoder: bert-base-uncased\n    embedding_sizes: [0]\n", "blocks[0].embedding_sizes[0]", "positive integer"),
    "empty size list": ("blocks:\n  - name: b\n    encoder: bert-base-uncased\n    embedding_sizes: []\n", "blocks[0].embedding_sizes", "non-empty"),
    "empty block list": ("blocks: []\n", "blocks", "non-empty"),
    "duplicate cell": ("blocks:\n" + VALID_BLOCK + "  - name: c\n    encoder: bert-base-uncased\n    embedding_sizes: [64]\n", "blocks[1].embedding_sizes[0]", "duplicate cell"),
    "bad choice": ("defaults: {index: {type: ivf}}\nblocks:\n" + VALID_BLOCK, "defaults.index.type", "hnsw_flat, flat"),
    "boolean as number": ("defaults: {train: {batch_size: true}}\nblocks:\n" + VALID_BLOCK, "defaults.train.batch_size", "expected an integer"),
    "yaml syntax": ("blocks:\n  - name: b\n    encoder: [unclosed\n", "line ", "YAML syntax error"),
    "run folder name": ("blocks:\n" + VALID_BLOCK, "name", "folder name"),
    "negative checkpoint interval": ("defaults: {checkpoint: {every_steps: -1}}\nblocks:\n" + VALID_BLOCK, "defaults.checkpoint.every_steps", "a number >= 0"),
    "auto batch with gradient cache": ("defaults: {train: {batch_size: auto}, grad_cache: {chunk_size: 4}}\nblocks:\n" + VALID_BLOCK, "blocks[0].train.batch_size", "expected a number with grad_cache"),
    "unknown precision": ("defaults: {precision: fp8}\nblocks:\n" + VALID_BLOCK, "defaults.precision", "auto, fp32, bf16, fp16"),
    "unknown stage precision": ("defaults: {precision: {train: fp16, encode: int8}}\nblocks:\n" + VALID_BLOCK, "defaults.precision.encode", "auto, fp32, bf16, fp16"),
    "unknown passage format": ("defaults: {text: {passage_format: pair}}\nblocks:\n" + VALID_BLOCK, "defaults.text.passage_format", "paper, dpr"),
    "unknown hard negative": ("defaults: {train: {hard_negative: random}}\nblocks:\n" + VALID_BLOCK, "defaults.train.hard_negative", "first, shuffle"),
    "negative clipping norm": ("defaults: {train: {max_grad_norm: -1}}\nblocks:\n" + VALID_BLOCK, "defaults.train.max_grad_norm", "0: no clipping"),
    "LR floor of 1": ("defaults: {train: {lr_floor: 1.0}}\nblocks:\n" + VALID_BLOCK, "defaults.train.lr_floor", "[0, 1)"),
    "missing encoder": ("blocks:\n  - name: b\n    embedding_sizes: [64]\n", "blocks[0].encoder", "missing"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_grid_is_one_line_error_with_key_path_and_exit_2(case, capsys, data_files):
    body, key_path, expected = MALFORMED[case]
    name = "my runs/x" if case == "run folder name" else "g"
    path = write_grid(data_files, f"name: {name}\ndata: {{train: train.json, dev: dev.json}}\n" + body)
    code, out, err = run_cli(capsys, "plan", path)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and key_path in lines[0] and expected in lines[0]


def test_missing_data_file_stops_submit_before_anything_starts(capsys, data_files, tmp_path):
    path = write_grid(data_files, "name: g\ndata: {train: nowhere.json, dev: dev.json}\nblocks:\n" + VALID_BLOCK)
    code, _, err = run_cli(capsys, "submit", path, "--runs-root", tmp_path / "runs")
    assert code == 2
    assert "data.train" in err and "nowhere.json" in err
    assert not (tmp_path / "runs").exists()


def test_console_script_prints_no_traceback(data_files):
    path = write_grid(data_files, "name: g\nblocks: 3\n")
    done = subprocess.run([sys.executable, "-m", "dpr_hpc", "plan", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("dpr-hpc: error: ") and "blocks" in done.stderr


def test_grid_error_names_file_key_and_expectation():
    error = GridError("g.yaml", "blocks[0].x", "expected y")
    assert str(error) == "g.yaml: blocks[0].x: expected y"


def test_index_keep_is_validated_and_changes_no_cell_id(data_files):
    from dpr_hpc.grid.config import cell_from_json

    text = "name: g\ndata: {train: train.json, dev: dev.json}\ndefaults: {index: {keep: KEEP}}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n"
    default = load_grid(write_grid(data_files, text.replace("defaults: {index: {keep: KEEP}}\n", ""), "a.yaml")).cells[0]
    keep_all = load_grid(write_grid(data_files, text.replace("KEEP", "all"), "b.yaml")).cells[0]
    assert (default.index.keep, keep_all.index.keep) == ("first", "all")
    assert default.cell_id == keep_all.cell_id
    assert cell_from_json(keep_all.to_json()).index.keep == "all"
    with pytest.raises(GridError, match=r"b.yaml: defaults.index.keep: expected one of first, all"):
        load_grid(write_grid(data_files, text.replace("KEEP", "some"), "b.yaml"))
