"""The token cache: one tokenization per tokenizer, data content and settings, built once even
when jobs ask for it at the same moment, rebuilt when the data changes, and filed under the
content the tokens were made from."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from dpr_hpc.inputs.content import sha256_bytes
from dpr_hpc.modeling.batching import TokenizedTexts, tokenize_questions
from dpr_hpc.modeling.encoder import load_tokenizer
from dpr_hpc.modeling.token_cache import TokenCache, tokenizer_fingerprint


def _texts(n: int) -> TokenizedTexts:
    return TokenizedTexts(np.arange(n, dtype=np.int32), None, np.array([0, n], dtype=np.int64))


def test_second_request_reads_the_cache_and_a_changed_file_is_tokenized_again(demo_assets, tmp_path):
    tokenizer = load_tokenizer(str(demo_assets / "models" / "tiny-bert"))
    data = sha256_bytes(b'["one"]')
    cache = TokenCache(tmp_path / "cache")
    builds = []

    def build() -> TokenizedTexts:
        builds.append(1)
        return tokenize_questions(tokenizer, ["what is it?", "who?"], 32)

    first = cache.get("dev-questions", data, tokenizer, {"max_length": 32}, build)
    second = cache.get("dev-questions", data, tokenizer, {"max_length": 32}, build)
    assert (first.hit, second.hit, len(builds)) == (False, True, 1)
    assert np.array_equal(first.texts.ids, second.texts.ids) and np.array_equal(first.texts.types, second.texts.types)
    assert not cache.get("dev-questions", data, tokenizer, {"max_length": 16}, build).hit  # other settings
    data = sha256_bytes(b'["two"]')
    assert not cache.get("dev-questions", data, tokenizer, {"max_length": 32}, build).hit  # changed content
    assert len(builds) == 3


def test_tokenizers_with_another_vocabulary_get_another_fingerprint(demo_assets):
    bert = load_tokenizer(str(demo_assets / "models" / "tiny-bert"))
    assert tokenizer_fingerprint(bert) == tokenizer_fingerprint(load_tokenizer(str(demo_assets / "models" / "tiny-bert")))
    other = load_tokenizer(str(demo_assets / "models" / "tiny-bert"))
    other.add_tokens(["zzznewtoken"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(bert)


def _request(folder: str, data: str, log: str, waits: str, contenders: int, result: str) -> None:
    from transformers import AutoTokenizer  # noqa: F401 (the child imports what a job imports)
    from waiting import note_lock_waits, wait_for_lock_waiters

    class Fake:
        backend_tokenizer = None

        def get_vocab(self):
            return {"a": 0}

    def build() -> TokenizedTexts:
        with open(log, "a") as handle:
            handle.write("built\n")
        # Inside the lock until every other job is blocked on it: the race, on every run.
        wait_for_lock_waiters(Path(waits), contenders - 1)
        return _texts(5)

    note_lock_waits(Path(waits), ".npz.lock")
    hit = TokenCache(Path(folder)).get("train-questions", data, Fake(), {}, build).hit
    Path(result).write_text(str(hit))


def test_concurrent_jobs_build_a_missing_entry_once(tmp_path):
    """Three jobs ask for the same missing entry; the one that builds it holds the lock until
    the other two are waiting on it (a barrier, not a sleep), and they then read its entry."""
    data = sha256_bytes(b"[]")
    log = tmp_path / "builds.log"
    spawn = multiprocessing.get_context("spawn")
    jobs = [spawn.Process(target=_request, args=(str(tmp_path / "cache"), data, str(log), str(tmp_path / "waits"), 3,
                                                 str(tmp_path / f"hit-{n}")))
            for n in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=300)
    assert [job.exitcode for job in jobs] == [0, 0, 0]
    assert log.read_text().count("built") == 1
    assert len(set((tmp_path / "waits").read_text().split())) == 2  # both others met the held lock
    assert sorted((tmp_path / f"hit-{n}").read_text() for n in range(3)) == ["False", "True", "True"]


def _truncate(entry: Path) -> None:
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])


def _empty(entry: Path) -> None:
    entry.write_bytes(b"")


def _not_a_zip(entry: Path) -> None:
    entry.write_bytes(b"PK\x03\x04 this is not the rest of a zip file")


def _offsets_past_the_ids(entry: Path) -> None:
    np.savez(entry.open("wb"), ids=np.arange(3, dtype=np.int32), offsets=np.array([0, 9], dtype=np.int64))


def _missing_array(entry: Path) -> None:
    np.savez(entry.open("wb"), ids=np.arange(3, dtype=np.int32))


@pytest.mark.parametrize("damage", [_truncate, _empty, _not_a_zip, _offsets_past_the_ids, _missing_array])
def test_a_damaged_entry_is_built_again_with_a_warning(tmp_path, caplog, damage):
    data = sha256_bytes(b"[]")
    cache = TokenCache(tmp_path / "cache")
    fake = type("Fake", (), {"backend_tokenizer": None, "get_vocab": lambda self: {"a": 0}})()
    assert not cache.get("train-questions", data, fake, {}, lambda: _texts(5)).hit
    (entry,) = (tmp_path / "cache").glob("train-questions-*.npz")
    damage(entry)
    with caplog.at_level("WARNING"):
        again = cache.get("train-questions", data, fake, {}, lambda: _texts(7))
    assert not again.hit and len(again.texts) == 1 and len(again.texts.ids) == 7
    assert "is damaged" in caplog.text and "tokenizing again" in caplog.text
    assert cache.get("train-questions", data, fake, {}, lambda: _texts(9)).hit  # the rebuilt entry is whole
    assert not list((tmp_path / "cache").glob("*.lock"))


def test_tokens_are_filed_under_the_content_they_were_made_from(demo_assets, tmp_path):
    """New data moved over dev.json after a job prepared it: the tokens the job makes from the
    prepared questions are keyed by the content those came from, not by what the path holds
    now (which another job would then read as already tokenized)."""
    import os
    from types import SimpleNamespace

    from dpr_hpc.grid.config import TextConfig
    from dpr_hpc.planning.plan import StageJob
    from dpr_hpc.inputs.prepared import load_dev
    from dpr_hpc.stages.common import StageIO, tokenized

    def dev_file(question: str) -> bytes:
        return json.dumps([{"question": question, "answers": ["a"], "positive_ctxs": [{"title": "", "text": "x", "passage_id": "1"}]}]).encode()

    data, incoming = tmp_path / "dev.json", tmp_path / "incoming.json"
    data.write_bytes(dev_file("what was asked first?"))
    incoming.write_bytes(dev_file("what is asked now?"))
    dev = load_dev(data, tmp_path / "prepared")
    os.replace(incoming, data)
    tokenizer = load_tokenizer(str(demo_assets / "models" / "tiny-bert"))
    cell = SimpleNamespace(text=TextConfig())
    io = StageIO(job=StageJob("infer", "k", 0), out=None, prepared_cache=tmp_path / "prepared", token_cache=tmp_path / "tokens")
    questions = [q.question for q in dev.dev_questions()]
    made = tokenized(io, cell, "dev-questions", dev, tokenizer, lambda: tokenize_questions(tokenizer, questions, 32))
    first = TokenCache(None).key("dev-questions", sha256_bytes(dev_file("what was asked first?")), tokenizer, cell.text.token_settings())
    assert questions == ["what was asked first?"] and made.key == first
