"""A cell evaluated on a corpus apart from the dev pool (issue 24): the grid's `corpus:` key, the
stage graph it plans (encode-shard and search-shard per shard, one merge), sharded search against
unsharded search, fp16 vectors, and a failed shard that reruns alone."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import run_cli, write_grid
from dpr_hpc.errors import GridError
from dpr_hpc.grid import load_grid
from dpr_hpc.inputs.corpus import CorpusFormatError, CorpusQuestion, read_questions, read_shard, write_passages, write_questions
from dpr_hpc.inputs.data import Passage
from dpr_hpc.modeling.searcher import search_batch, shard_index
from dpr_hpc.grid.config import IndexConfig
from dpr_hpc.planning.plan import StageJob, make_plan
from dpr_hpc.scoring.merge import merge_top_k

WORDS = "the of a river city king war year song film team born law old new north south".split()


def corpus_files(folder, passages: int = 300, seed: int = 0):
    rng = random.Random(seed)
    rows = [Passage(str(i + 1), f"Title {i}", " ".join(rng.choice(WORDS) for _ in range(12)) + (' "quoted" end' if i % 7 == 0 else ""))
            for i in range(passages)]
    write_passages(folder / "psgs.tsv", rows)
    write_questions(folder / "test.qa.csv", [CorpusQuestion("who was the king", ("king",)), CorpusQuestion("which river", ("river", "song"))])
    return folder / "psgs.tsv", folder / "test.qa.csv"


def corpus_grid(folder, corpus: str = "{passages: psgs.tsv, questions: test.qa.csv, shards: 4, parallel: 2}", blocks: str = "") -> object:
    """A grid of one block of a local model (folder ./m) whose defaults name `corpus`; `blocks`:
    more blocks, as YAML lines."""
    (folder / "train.json").write_text("[]")
    (folder / "dev.json").write_text("[]")
    (folder / "m").mkdir(exist_ok=True)
    text = (f"name: c\ndata: {{train: train.json, dev: dev.json}}\ndefaults:\n  corpus: {corpus}\n"
            f"blocks:\n  - {{name: b, encoder: ./m, embedding_sizes: [8]}}\n{blocks}")
    return write_grid(folder, text)


# --- the grid ----------------------------------------------------------------------------------

@pytest.mark.parametrize("corpus, key, expected", [
    ("{passages: psgs.tsv, questions: test.qa.csv, shards: 0}", "defaults.corpus.shards", "a positive number of shards"),
    ("{passages: psgs.tsv, questions: test.qa.csv, vectors: int8}", "defaults.corpus.vectors", "one of fp32, fp16"),
    ("{passages: psgs.tsv, questions: test.qa.csv, index: ivf}", "defaults.corpus.index", "one of flat, hnsw"),
    ("{passages: psgs.tsv, questions: test.qa.csv, shard: 3}", "defaults.corpus.shard", "did you mean 'shards'"),
    ("{questions: test.qa.csv}", "blocks[0].corpus.passages", "missing; expected DPR's passages TSV"),
    ("{passages: psgs.tsv, questions: 3}", "defaults.corpus.questions", "expected a file path"),
    ("psgs.tsv", "defaults.corpus", "expected a mapping"),
    ("{passages: nowhere.tsv, questions: test.qa.csv}", "corpus.passages", "not found"),
])
def test_a_bad_corpus_setting_is_an_error_naming_the_file_key_and_what_was_expected(tmp_path, corpus, key, expected):
    corpus_files(tmp_path, 10)
    grid = corpus_grid(tmp_path, corpus)
    with pytest.raises(GridError) as error:
        load_grid(grid)
    assert str(grid) in str(error.value) and f": {key}: " in str(error.value) and expected in str(error.value)


def test_corpus_settings_merge_by_level_and_null_turns_the_corpus_off(tmp_path):
    corpus_files(tmp_path, 10)
    grid = corpus_grid(tmp_path, blocks="  - {name: half, encoder: ./m, corpus: {vectors: fp16, parallel: 1}, embedding_sizes: [8]}\n"
                                        "  - {name: none, encoder: ./m, corpus: null, embedding_sizes: [8]}\n")
    first, half, none = load_grid(grid).cells
    assert (first.corpus.shards, first.corpus.vectors, first.corpus.array_parallel) == (4, "fp32", 2)
    assert (half.corpus.shards, half.corpus.vectors, half.corpus.array_parallel) == (4, "fp16", 1)
    assert none.corpus is None and none.stages == ("train", "index", "infer")
    assert first.stages == ("train", "index", "infer", "encode-shard", "search-shard", "merge")


# --- the plan -----------------------------------------------------------------------------------

def test_a_corpus_cell_plans_a_job_per_shard_and_stage_each_with_its_own_key_after_its_training(tmp_path):
    corpus_files(tmp_path, 10)
    plan = make_plan(load_grid(corpus_grid(tmp_path)))
    cell = plan.cells[0].cell_id
    encode, search, merge = (plan.cell_jobs(cell, s) for s in ("encode-shard", "search-shard", "merge"))
    assert len(encode) == len(search) == 4 and len(merge) == 1
    assert len({j.key for j in encode + search + merge}) == 9
    train = StageJob("train", plan.keys[cell]["train"], 0)
    assert all(plan.dependencies(j) == (train,) for j in encode)
    assert [plan.dependencies(j) for j in search] == [(e,) for e in encode]
    assert plan.inputs(search[2]) == (train, encode[2])  # the question tower, and its own shard
    assert plan.dependencies(merge[0]) == tuple(search)
    order = list(plan.jobs())
    assert all(order.index(dep) < order.index(job) for job in order for dep in plan.dependencies(job))
    groups = plan.array_groups()
    assert [(g.name.split("/")[0], g.jobs, g.parallel) for g in groups] == [("encode-shard", tuple(encode), 2), ("search-shard", tuple(search), 2)]


def test_logs_shows_the_log_of_the_shard_asked_for_and_names_the_shards_there_are(tmp_path, capsys):
    """A shard stage has one job per shard, each an array task on SLURM with its own log:
    `logs CELL --stage encode-shard --shard 2` prints shard 2's, and a shard out of range, or
    --shard with a stage that has no shards, is a one-line usage error."""
    from dpr_hpc.store.layout import RunLayout
    from dpr_hpc.store.bindings import save_plan

    corpus_files(tmp_path, 10)
    grid_file = corpus_grid(tmp_path)
    plan = make_plan(load_grid(grid_file))
    layout = RunLayout(tmp_path / "runs" / "c")
    save_plan(layout, plan, grid_file)
    cell = plan.cells[0].cell_id
    for shard, job in enumerate(plan.cell_jobs(cell, "encode-shard")):
        jobs = layout.store.job(job).jobs
        jobs.mkdir(parents=True)
        (jobs / f"77_{shard}_0_log.out").write_text(f"encoding shard {shard}\n")

    code, out, err = run_cli(capsys, "logs", cell, "--stage", "encode-shard", "--shard", "2", "--runs-root", tmp_path / "runs")
    assert code == 0 and "encoding shard 2" in out and "shard 0" not in out, out + err
    code, out, _ = run_cli(capsys, "logs", cell, "--stage", "encode-shard", "--runs-root", tmp_path / "runs")
    assert code == 0 and "encoding shard 0" in out
    code, _, err = run_cli(capsys, "logs", cell, "--stage", "encode-shard", "--shard", "4", "--runs-root", tmp_path / "runs")
    assert code != 0 and f"--shard 4: cell {cell}'s corpus has the shards 0 to 3" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "logs", cell, "--stage", "train", "--shard", "1", "--runs-root", tmp_path / "runs")
    assert code != 0 and "--shard 1: only with --stage encode-shard or --stage search-shard" in err


def test_a_saved_plan_lists_the_shards_in_dependency_and_shard_order(tmp_path):
    """plan.json is written with sorted keys ('encode-shard#10' before 'encode-shard#2', 'merge'
    before 'train'); the plan read back runs its jobs in the same order as the one planned."""
    from dpr_hpc.planning.plan import Plan

    corpus_files(tmp_path, 30)
    plan = make_plan(load_grid(corpus_grid(tmp_path, "{passages: psgs.tsv, questions: test.qa.csv, shards: 12}")))
    saved = Plan.from_json(json.loads(json.dumps(plan.to_json(), sort_keys=True)))
    assert list(saved.jobs()) == list(plan.jobs())
    assert saved.array_groups() == plan.array_groups()
    assert [plan.slot(j) for j in saved.cell_jobs(plan.cells[0].cell_id, "search-shard")] == [f"search-shard#{i}" for i in range(12)]


def test_a_cell_evaluated_on_the_dev_pool_and_on_a_corpus_shares_its_training(tmp_path):
    """Within a grid (a cell with a corpus beside one without), and across grids: the train,
    index and infer keys do not depend on the corpus, so one training serves both."""
    corpus_files(tmp_path, 10)
    grid = corpus_grid(tmp_path, blocks="  - {name: dev-only, encoder: ./m, corpus: null, embedding_sizes: [8]}\n")
    plan = make_plan(load_grid(grid))
    with_corpus, dev_only = plan.cells
    assert with_corpus.cell_id != dev_only.cell_id
    for stage in ("train", "index", "infer"):
        assert plan.keys[with_corpus.cell_id][stage] == plan.keys[dev_only.cell_id][stage]
    train = plan.cell_jobs(with_corpus.cell_id, "train")[0]
    assert plan.users(train) == [with_corpus.cell_id, dev_only.cell_id]
    assert sum(1 for job in plan.jobs() if job.stage == "train") == 1
    # a second grid that names the same cell without a corpus plans the same training
    other = write_grid(tmp_path, "name: d\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: ./m, embedding_sizes: [8]}]\n", "d.yaml")
    assert make_plan(load_grid(other)).keys[load_grid(other).cells[0].cell_id]["train"] == plan.keys[with_corpus.cell_id]["train"]


def test_a_shard_key_changes_with_the_corpus_content_and_not_with_parallel(tmp_path):
    corpus_files(tmp_path, 10)
    grid = corpus_grid(tmp_path)
    before = make_plan(load_grid(grid)).keys
    grid.write_text(grid.read_text().replace("parallel: 2", "parallel: 3"))
    assert list(make_plan(load_grid(grid)).keys.values()) == list(before.values())
    corpus_files(tmp_path, 11)
    after = list(make_plan(load_grid(grid)).keys.values())[0]
    old = list(before.values())[0]
    assert after["train"] == old["train"] and after["encode-shard#0"] != old["encode-shard#0"]


# --- reading DPR's formats ------------------------------------------------------------------------

@pytest.mark.parametrize("shards", [1, 3, 4, 7])
def test_byte_range_shards_hold_every_passage_once_in_file_order(tmp_path, shards):
    passages, _ = corpus_files(tmp_path, 101)
    whole = read_shard(passages, 1, 0)
    assert [p.passage_id for p in whole.passages] == [str(i + 1) for i in range(101)]  # the header is skipped
    assert whole.passages[0].text.endswith('"quoted" end')  # csv quoting, as DPR's files have it
    parts = [read_shard(passages, shards, i) for i in range(shards)]
    assert [p for part in parts for p in part.passages] == whole.passages
    assert np.array_equal(np.concatenate([part.offsets for part in parts]), whole.offsets)


def test_a_malformed_corpus_line_is_an_error_naming_the_file_and_where(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\ttext\ttitle\n1\tsome text\tT\n2\tno title here\n")
    with pytest.raises(CorpusFormatError, match=r"bad.tsv: the line at byte 28 has 2 fields; expected DPR's passages format"):
        read_shard(bad, 1, 0)
    questions = tmp_path / "q.csv"
    questions.write_text("who?\t['a']\nwhat?\t[1, 2]\n")
    with pytest.raises(CorpusFormatError, match=r"q.csv: line 2: the answers are not a list of strings"):
        read_questions(questions)


# --- sharded search --------------------------------------------------------------------------------

def sharded_search(vectors: np.ndarray, queries: np.ndarray, shards: int, k: int):
    """What the search-shard jobs and the merge compute, on given vectors: global ids are rows."""
    bounds = np.linspace(0, len(vectors), shards + 1).astype(int)
    scores, ids = [], []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        found_scores, rows = search_batch(shard_index(vectors[begin:end], "flat", IndexConfig()), queries, k)
        scores.append(found_scores)
        ids.append(np.where(rows >= 0, rows + begin, -1))
    return merge_top_k(scores, ids, k)


def test_sharded_exact_search_equals_unsharded_exact_search_on_20000_passages_in_4_shards():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20_480, 64)).astype(np.float32)
    queries = rng.standard_normal((200, 64)).astype(np.float32)
    whole_scores, whole_ids = search_batch(shard_index(vectors, "flat", IndexConfig()), queries, 100)
    merged_scores, merged_ids = sharded_search(vectors, queries, 4, 100)
    assert np.array_equal(merged_ids, whole_ids)
    np.testing.assert_allclose(merged_scores, whole_scores, rtol=1e-5, atol=1e-4)


def test_fp16_vectors_change_scores_by_their_rounding_and_top_100_barely(capsys):
    """fp16 on disk: each vector rounded to 11 significant bits. Measured here on random 768-d
    vectors (scores ~N(0, 768)): the scores' error and the overlap of the top 100 are printed for
    the README; the assertion bounds them."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((20_480, 768)).astype(np.float32)
    queries = rng.standard_normal((100, 768)).astype(np.float32)
    exact_scores, exact_ids = sharded_search(vectors, queries, 4, 100)
    half_scores, half_ids = sharded_search(vectors.astype(np.float16).astype(np.float32), queries, 4, 100)
    overlap = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(exact_ids, half_ids)])
    same_top1 = float(np.mean(exact_ids[:, 0] == half_ids[:, 0]))
    relative = float(np.max(np.abs(half_scores[:, 0] - exact_scores[:, 0]) / np.abs(exact_scores[:, 0])))
    with capsys.disabled():
        print(f"\nfp16 vectors: top-100 overlap {overlap:.4f}, same top-1 {same_top1:.3f}, max relative error of the top score {relative:.2e}")
    assert overlap > 0.97 and same_top1 > 0.97 and relative < 1e-3


def test_merge_top_k_matches_a_full_sort_with_empty_slots_and_ties():
    rng = np.random.default_rng(2)
    scores = [np.round(rng.standard_normal((30, 5)), 1).astype(np.float32) for _ in range(3)]  # rounded: many ties
    ids = [np.arange(5)[None, :] * 3 + s + np.zeros((30, 1), dtype=np.int64) for s in range(3)]
    ids[2][:, 3:] = -1  # a shard of fewer passages than k
    merged_scores, merged_ids = merge_top_k(scores, ids, 8)
    for q in range(30):
        pairs = sorted((-float(s[q, j]), int(i[q, j])) for s, i in zip(scores, ids) for j in range(5) if i[q, j] >= 0)[:8]
        assert merged_ids[q].tolist() == [i for _, i in pairs]
        assert merged_scores[q].tolist() == [-s for s, _ in pairs]


# --- the stages, in the store ------------------------------------------------------------------------

EVAL_GRID = """\
    name: corpus-eval
    data: {{dev: {demo}/dev.json}}
    defaults:
      text: {{max_length: 64}}
      index: {{type: flat}}
      corpus: {{passages: {demo}/corpus/passages.tsv, questions: {demo}/corpus/questions.qa.csv, shards: 3}}
    blocks:
      - name: untrained
        encoder: {demo}/models/tiny-bert
        evaluate_only: true
        embedding_sizes: [64]
"""


def run_in_order(layout, plan) -> dict[str, list[str]]:
    """Every job of the plan in dependency order through the runner, in this process (so a test
    can make one fail), leaving a job whose dependency failed, as the local backend does."""
    from dpr_hpc.store.records import Records
    from dpr_hpc.stages.runner import run_stage_job

    outcome: dict[str, list[str]] = {"ran": [], "failed": [], "skipped": [], "blocked": []}
    failed: set[StageJob] = set()
    for job in plan.jobs():
        if Records(layout.store, plan=plan).check(job).complete:
            outcome["skipped"].append(job.id)
        elif any(dep in failed for dep in plan.dependencies(job)):
            failed.add(job)
            outcome["blocked"].append(job.id)
        else:
            try:
                run_stage_job(str(layout.runs_root), job.stage, job.key, job.repeat)
                outcome["ran"].append(job.id)
            except RuntimeError:
                failed.add(job)
                outcome["failed"].append(job.id)
    return outcome


def test_a_corpus_evaluation_runs_through_the_store_and_a_failed_shard_reruns_alone(demo_assets, tmp_path, monkeypatch, capsys):
    from dpr_hpc.store.layout import RunLayout
    from dpr_hpc.store.bindings import save_plan
    import dpr_hpc.stages.corpus as corpus_stages

    grid_file = write_grid(tmp_path, EVAL_GRID.format(demo=demo_assets), "corpus-eval.yaml")
    plan = make_plan(load_grid(grid_file))
    layout = RunLayout(tmp_path / "runs" / "corpus-eval")
    save_plan(layout, plan, grid_file)
    cell = plan.cells[0].cell_id
    encode, search, merge = (plan.cell_jobs(cell, s) for s in ("encode-shard", "search-shard", "merge"))

    real = corpus_stages.encode_shard

    def shard_1_fails(cell_config, io, repeat=0):
        if io.shard == 1:
            raise RuntimeError("node lost")
        return real(cell_config, io, repeat)

    monkeypatch.setattr(corpus_stages, "encode_shard", shard_1_fails)
    first = run_in_order(layout, plan)
    assert first["failed"] == [encode[1].id] and first["blocked"] == [search[1].id, merge[0].id]
    results = {job: layout.store.job(job).result.read_bytes() for job in (encode[0], encode[2], search[0], search[2])}

    code, out, _ = run_cli(capsys, "status", "--runs-root", layout.runs_root)
    assert "FAILED" in out and "BLOCKED" in out and "RuntimeError: node lost" in out
    # The table lists no shard task; the failed one has a line under its array's, with why (and its log where it has one).
    assert "  shard 1 FAILED: RuntimeError: node lost" in out.splitlines(), out

    monkeypatch.setattr(corpus_stages, "encode_shard", real)
    second = run_in_order(layout, plan)
    assert second["ran"] == [encode[1].id, search[1].id, merge[0].id]  # the failed shard alone, then what reads it
    assert all(layout.store.job(job).result.read_bytes() == before for job, before in results.items())

    records = {job: json.loads(layout.store.job(job).result.read_text()) for job in encode + search + merge}
    assert sum(records[j]["metrics"]["num_passages"] for j in encode) == 3000
    assert [records[j]["metrics"]["shard"] for j in encode] == [0, 1, 2]
    assert all(records[j]["node"] for j in encode + search + merge)
    for j in encode + search:  # what ran is recorded: compute.compile (auto: the demo never compiles) and the attention kernel
        assert records[j]["details"]["compute"]["compile"]["compiled"] is False and records[j]["details"]["compute"]["attention"] == "sdpa"
    shard_0 = layout.store.job(encode[0]).attempt(1)
    assert np.load(shard_0.vectors).dtype == np.float32 and len(np.load(shard_0.offsets)) == records[encode[0]]["metrics"]["num_passages"]
    merged = records[merge[0]]["metrics"]
    assert merged["num_passages"] == 3000 and merged["num_questions"] == 96 and merged["shards"] == 3
    assert set(merged) >= {"answer_acc@1", "answer_acc@5", "answer_acc@20", "answer_acc@100", "mrr@100"}
    assert 0 <= merged["answer_acc@1"] <= merged["answer_acc@5"] <= merged["answer_acc@20"] <= merged["answer_acc@100"] <= 1

    code, out, _ = run_cli(capsys, "status", "--runs-root", layout.runs_root)
    assert code == 0 and "encode-shard" in out and "merge" in out and "FAILED" not in out
    code, out, _ = run_cli(capsys, "collect", "--runs-root", layout.runs_root, "--out", tmp_path / "results")
    table = (tmp_path / "results" / "corpus-eval.csv").read_text().splitlines()
    header = table[0].split(",")
    assert {"corpus", "corpus_shards", "corpus_acc@1", "corpus_acc@20", "corpus_acc@100", "corpus_mrr@100"} <= set(header)
    row = dict(zip(header, table[1].split(",")))
    assert row["corpus"] == "passages" and row["corpus_shards"] == "3"
    assert float(row["corpus_acc@20"]) == pytest.approx(merged["answer_acc@20"])
    code, _, err = run_cli(capsys, "report", "--runs-root", layout.runs_root, "--out", tmp_path / "results", "--no-html")
    report = (tmp_path / "results" / "corpus-eval" / "report.md").read_text()
    assert code == 0, err
    section = report.split("## Retrieval over the corpus", 1)[1]
    assert f"| passages | 3 | fp32 | flat | {merged['answer_acc@1']:.3f} |" in section


@pytest.mark.slow
def test_the_demo_corpus_grid_runs_on_the_local_backend(demo_assets, tmp_path):
    """jobs/demo-corpus.yaml as a checkout has it, reading the demo generate-demo wrote: the
    BERT-64 cell trains once and is evaluated on the dev pool and on the 3-shard corpus."""
    import shutil

    from conftest import REPO, cli

    (tmp_path / "jobs").mkdir()
    shutil.copy(REPO / "jobs" / "demo-corpus.yaml", tmp_path / "jobs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_assets)
    done = cli("submit", "jobs/demo-corpus.yaml", "--backend", "local", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "grid demo-corpus: 2 cells, 17 stage jobs" in done.stdout and "17 ran, 0 already complete" in done.stdout
    status = cli("status", "jobs/demo-corpus.yaml", cwd=tmp_path)
    assert status.returncode == 0 and "17 stage jobs: 17 COMPLETED" in status.stdout
    assert cli("collect", "jobs/demo-corpus.yaml", cwd=tmp_path).returncode == 0
    table = (tmp_path / "results" / "demo-corpus.csv").read_text().splitlines()
    header = table[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in table[1:]]
    assert sorted(r["corpus_vectors"] for r in rows) == ["fp16", "fp32"] and {r["corpus_shards"] for r in rows} == {"3"}
    assert all(0 <= float(r["corpus_acc@100"]) <= 1 for r in rows)


def test_a_shard_searched_a_block_at_a_time_gives_the_whole_shards_exact_top_k(tmp_path):
    """search-shard never holds a shard's vectors: it reads them in blocks and keeps a running
    top-k, which must be what one IndexFlatIP over the whole shard returns."""
    import faiss

    from dpr_hpc.modeling.searcher import exact_search_streamed

    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((5_000, 32)).astype(np.float32)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    np.save(tmp_path / "vectors.npy", vectors)
    whole = faiss.IndexFlatIP(32)
    whole.add(vectors)
    want_scores, want_rows = whole.search(queries, 100)
    scores, rows = exact_search_streamed(tmp_path / "vectors.npy", queries, 100, chunk_rows=777)
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    np.save(tmp_path / "few.npy", vectors[:30])  # fewer rows than k: the rest are -1, as FAISS leaves them
    scores, rows = exact_search_streamed(tmp_path / "few.npy", queries, 100, chunk_rows=7)
    assert (rows[:, 30:] == -1).all() and sorted(rows[0, :30]) == list(range(30))
