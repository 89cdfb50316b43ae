"""Prepared data: a data file is parsed once per content; later jobs, requeues and repeats map it.

Parses are counted by wrapping the streaming reader the prepared module calls; a parse that
happens in another process is told by the `.hit` flag and the entry's manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import dpr_hpc.inputs.prepared as prepared
from dpr_hpc.inputs.data import iter_records
from dpr_hpc.errors import DataFormatError
from dpr_hpc.demo.nq_shape import write_nq_shaped
from dpr_hpc.inputs.prepared import load_dev, load_train
from dpr_hpc.resume.signals import TrainingInterrupted
from conftest import REPO, StopAfter, run_folder, train_in_process


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """The files the prepared module parsed in this process, in order."""
    parsed: list[str] = []

    def counting(path, *args):
        parsed.append(Path(path).name)
        return iter_records(path, *args)

    monkeypatch.setattr(prepared, "iter_records", counting)
    return parsed


@pytest.fixture(scope="module")
def nq_small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nq")
    write_nq_shaped(out, fraction=0.002, seed=3)
    return out


def _reference_train(path: Path) -> list[tuple]:
    """What training reads, computed the plain way from the whole JSON."""
    examples = []
    for record in json.loads(path.read_text()):
        if not record["positive_ctxs"]:
            continue
        negatives = record["hard_negative_ctxs"] or record["negative_ctxs"]
        examples.append((record["question"], record["positive_ctxs"][0]["passage_id"], record["positive_ctxs"][0]["text"],
                         [(n["passage_id"], n["title"], n["text"]) for n in negatives]))
    return examples


def test_prepared_train_holds_what_training_reads(nq_small, tmp_path, parses):
    train = load_train(nq_small / "train.json", tmp_path / "cache")
    examples = [train.example(i) for i in range(len(train))]
    got = [(e.question, e.positive.passage_id, e.positive.text, [(n.passage_id, n.title, n.text) for n in e.negatives]) for e in examples]
    assert got == _reference_train(nq_small / "train.json")
    assert not train.hit and parses == ["train.json"] and train.manifest["parser"] == "yajl2_c"
    assert train.folder.parent == tmp_path / "cache" and train.folder.name.endswith("-train-v1")


def test_prepared_dev_holds_the_questions_and_the_deduplicated_pool(nq_small, tmp_path):
    dev = load_dev(nq_small / "dev.json", tmp_path / "cache")
    records = json.loads((nq_small / "dev.json").read_text())
    first_seen: dict[str, str] = {}
    entries = 0
    for record in records:
        contexts = record["positive_ctxs"][:1] + record["hard_negative_ctxs"] + record["negative_ctxs"]
        entries += len(contexts)
        for ctx in contexts:
            first_seen.setdefault(ctx["passage_id"], ctx["text"])
    assert dev.pool_with_duplicates == entries > len(dev.pool) == len(first_seen)
    assert list(dev.pool.ids) == list(first_seen) and list(dev.pool.texts) == list(first_seen.values())
    assert [x.decode() for x in dev.pool.ids.fixed_width_bytes()] == list(first_seen)
    questions = dev.dev_questions()
    assert [(q.question, q.gold_id, q.answers, q.record_index) for q in questions] == [
        (r["question"], r["positive_ctxs"][0]["passage_id"], tuple(r["answers"]), i) for i, r in enumerate(records)]


def test_a_second_load_maps_and_a_changed_file_is_prepared_again(tmp_path, parses):
    data = tmp_path / "dev.json"
    record = {"question": "q?", "answers": ["a"], "positive_ctxs": [{"title": "t", "text": "café ☕", "passage_id": "1"}],
              "hard_negative_ctxs": [{"title": "", "text": "x", "psg_id": 2}]}
    data.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    first = load_dev(data, tmp_path / "cache")
    second = load_dev(data, tmp_path / "cache")
    assert (first.hit, second.hit, parses) == (False, True, ["dev.json"])
    assert second.folder == first.folder and list(second.pool.texts) == ["café ☕", "x"] and second.pool[1].passage_id == "2"

    data.write_text(json.dumps([record, {**record, "question": "another?"}]), encoding="utf-8")
    changed = load_dev(data, tmp_path / "cache")
    assert not changed.hit and changed.folder != first.folder and len(changed) == 2
    assert parses == ["dev.json", "dev.json"]
    assert first.folder.is_dir()  # the old content's entry stays for runs that still read it


def _dev_records(question: str) -> bytes:
    record = {"question": question, "answers": ["a"], "positive_ctxs": [{"title": "t", "text": "x", "passage_id": "1"}]}
    return json.dumps([record]).encode()


def test_data_moved_into_place_between_hashing_and_parsing_is_filed_under_its_own_hash(tmp_path, monkeypatch):
    """`mv new.json dev.json` while a job prepares dev.json: the entry holds what was parsed,
    under that content's hash, never the new file's rows under the old file's hash."""
    data, incoming, cache = tmp_path / "dev.json", tmp_path / "incoming.json", tmp_path / "cache"
    data.write_bytes(_dev_records("first?"))
    incoming.write_bytes(_dev_records("second?"))
    hash_only = prepared.data_file_sha256

    def hash_then_swap(*args):
        digest = hash_only(*args)
        os.replace(incoming, data)
        return digest

    monkeypatch.setattr(prepared, "data_file_sha256", hash_then_swap)
    during = load_dev(data, cache)
    assert during.manifest["sha256"] == hashlib.sha256(_dev_records("first?")).hexdigest()
    assert [q.question for q in during.dev_questions()] == ["first?"]
    monkeypatch.setattr(prepared, "data_file_sha256", hash_only)
    after = load_dev(data, cache)
    assert not after.hit and after.manifest["sha256"] == hashlib.sha256(_dev_records("second?")).hexdigest()
    assert [q.question for q in after.dev_questions()] == ["second?"]


def test_data_rewritten_in_place_while_it_is_parsed_is_not_filed(tmp_path, monkeypatch):
    data, cache = tmp_path / "dev.json", tmp_path / "cache"
    data.write_bytes(_dev_records("first?"))

    def rewritten_while_read(path, *args):
        yield from iter_records(path, *args)
        with data.open("r+b") as handle:  # the same inode, longer now
            handle.write(_dev_records("a longer question?"))

    monkeypatch.setattr(prepared, "iter_records", rewritten_while_read)
    with pytest.raises(ValueError, match="written to while it was being prepared"):
        load_dev(data, cache)
    assert not [p for p in cache.iterdir() if p.name.endswith("-dev-v1")]


def test_a_damaged_entry_is_prepared_again_with_a_warning(nq_small, tmp_path, parses, caplog):
    built = load_train(nq_small / "train.json", tmp_path / "cache")
    expected = built.example(0)
    damaged = built.folder / "negative_text.bin"
    damaged.unlink()  # a new, shorter file: the mapped one must not shrink under its reader
    damaged.write_bytes(b"truncated")
    again = load_train(nq_small / "train.json", tmp_path / "cache")
    assert not again.hit and parses == ["train.json", "train.json"]
    assert "damaged" in caplog.text and again.example(0) == expected


def test_bad_data_is_named_by_file_and_record(tmp_path):
    bad_context = tmp_path / "bad.json"
    bad_context.write_text(json.dumps([{"question": "q", "positive_ctxs": [{"title": "x"}]}]))
    with pytest.raises(DataFormatError, match=r"bad.json: record 0: positive_ctxs\[0\]: expected 'passage_id' and 'text'"):
        load_dev(bad_context, tmp_path / "cache")
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text('{"question": "q"}')
    with pytest.raises(DataFormatError, match="object.json: expected a JSON list of question records"):
        load_train(not_a_list, tmp_path / "cache")
    cut = tmp_path / "cut.json"
    cut.write_text('[{"question": "q", "positive_ctxs": [')
    with pytest.raises(DataFormatError, match="cut.json: not valid JSON"):
        load_train(cut, tmp_path / "cache")
    assert not any(p.name.endswith("-v1") for p in (tmp_path / "cache").iterdir())  # nothing half-built is left


def test_without_the_c_parser_the_build_warns_and_records_the_parser(tmp_path, monkeypatch, caplog):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"question": "q", "positive_ctxs": [{"title": "t", "text": "x", "passage_id": "1"}]}]))
    monkeypatch.setattr(prepared, "json_parser_backend", lambda: "python")
    train = load_train(data, tmp_path / "cache")
    assert train.manifest["parser"] == "python" and "C backend yajl2_c is not installed" in caplog.text


CONCURRENT_LOAD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import dpr_hpc.inputs.prepared as prepared
    from waiting import note_lock_waits, wait_for_lock_waiters

    waits = Path(sys.argv[3])
    reader = prepared.iter_records
    def held_reader(path, *args):  # the parse, under the lock, waits until the other job is blocked on it
        wait_for_lock_waiters(waits, 1)
        return reader(path, *args)
    prepared.iter_records = held_reader
    note_lock_waits(waits, "-dev-v%d.lock" % prepared.PREPARED_FORMAT["dev"])
    data = prepared.load_dev(Path(sys.argv[1]), Path(sys.argv[2]))
    print(data.hit, data.manifest["built_by"].split(":")[1], len(data.pool))
""")


def test_concurrent_jobs_build_the_entry_once(nq_small, tmp_path):
    """Two jobs want the same missing entry: the one that parses holds the lock until the
    other is waiting on it (a barrier, not a sleep), which then maps what the first built."""
    waits = tmp_path / "waits"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    jobs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_LOAD, str(nq_small / "dev.json"), str(tmp_path / "cache"), str(waits)],
                             env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    lines = [job.communicate(timeout=300)[0].split() for job in jobs]
    assert all(job.returncode == 0 for job in jobs)
    assert sorted(line[0] for line in lines) == ["False", "True"]  # one built, the other waited and mapped
    builder = next(job for job, line in zip(jobs, lines) if line[0] == "False")
    assert {line[1] for line in lines} == {str(builder.pid)} and lines[0][2] == lines[1][2]
    assert set(waits.read_text().split()) == {str(job.pid) for job in jobs if job is not builder}  # it met the held lock
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [load_dev(nq_small / "dev.json", tmp_path / "cache").folder.name]


def test_a_second_train_job_and_a_requeued_one_map_the_prepared_data(demo_assets, tmp_path, parses):
    layout, cell_id = run_folder(tmp_path, demo_assets, "first")
    with pytest.raises(TrainingInterrupted):
        train_in_process(layout, cell_id, StopAfter(3))
    assert parses == ["train.json"]
    requeued = train_in_process(layout, cell_id)  # the same job started again, from its checkpoint
    assert requeued.details["restarts"] == 1 and requeued.details["prepared_data"]["hit"] is True

    # Another training (its own key) under the same runs root.
    other, other_cell = run_folder(tmp_path, demo_assets, "second", extra="    train: {seed: 99, epochs: 1}\n")
    second = train_in_process(other, other_cell)
    assert second.details["prepared_data"]["hit"] is True and parses == ["train.json"]
    assert second.details["prepared_data"]["entry"] == requeued.details["prepared_data"]["entry"]


def test_infer_reads_passage_ids_saved_as_bytes_and_as_str_by_older_stores(tmp_path):
    from dpr_hpc.stages.infer import passage_id

    np.save(tmp_path / "bytes.npy", np.array([b"12", b"7"]))
    np.save(tmp_path / "str.npy", np.array(["12", "7"]))  # before the ids were saved as bytes
    for name in ("bytes.npy", "str.npy"):
        ids = np.load(tmp_path / name, mmap_mode="r")
        assert [passage_id(ids[i]) for i in range(len(ids))] == ["12", "7"]
