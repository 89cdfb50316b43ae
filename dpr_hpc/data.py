"""DPR's biencoder JSON format: training triples, the evaluation passage pool, dev questions.

Each record: {"question", "answers", "positive_ctxs", "negative_ctxs", "hard_negative_ctxs"},
each context {"title", "text", "passage_id"} (DPR's own files sometimes say "psg_id").
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Passage:
    passage_id: str
    title: str
    text: str


@dataclass(frozen=True)
class TrainingExample:
    """A question with its gold passage and the negatives one is drawn from: its hard negatives,
    else its plain negatives (DPR's fallback; the paper's code takes the same first one)."""

    question: str
    positive: Passage
    negatives: tuple[Passage, ...] = ()

    @property
    def negative(self) -> Passage | None:
        """The first negative: what the paper's code trains with every epoch."""
        return self.negatives[0] if self.negatives else None


@dataclass(frozen=True)
class DevQuestion:
    question: str
    answers: tuple[str, ...]
    gold_id: str
    # Its position in the dev file: a question id that stays the same whichever questions are
    # skipped, so run and qrels files written by different stages agree.
    record_index: int = -1


class DataFormatError(ValueError):
    """The file is not in DPR's biencoder format; the message names the record and key."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The file's records, read as UTF-8 (a byte-order mark allowed), whatever the locale."""
    try:
        with Path(path).open(encoding="utf-8-sig") as handle:
            records = json.load(handle)
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not valid UTF-8 at byte {first_invalid_utf8_byte(Path(path))}; save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: expected a JSON list of question records")
    return records


def first_invalid_utf8_byte(path: Path) -> int:
    """The byte offset of the first byte that is not UTF-8 (read in chunks: data files are GBs)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                return consumed - pending + exc.start
            if not chunk:
                return -1
            consumed += len(chunk)


def training_examples(records: list[dict[str, Any]], source: str = "data") -> list[TrainingExample]:
    """One example per question that has a positive; DPR skips the others too."""
    examples = []
    for i, record in enumerate(records):
        positives = _contexts(record, "positive_ctxs", source, i)
        if not positives:
            continue
        negatives = _contexts(record, "hard_negative_ctxs", source, i) or _contexts(record, "negative_ctxs", source, i)
        examples.append(TrainingExample(_question(record, source, i), positives[0], tuple(negatives)))
    return examples


def dev_questions(records: list[dict[str, Any]], source: str = "data") -> list[DevQuestion]:
    questions = []
    for i, record in enumerate(records):
        positives = _contexts(record, "positive_ctxs", source, i)
        if not positives:
            continue
        answers = record.get("answers", [])
        questions.append(DevQuestion(_question(record, source, i), tuple(str(a) for a in answers), positives[0].passage_id, i))
    return questions


def evaluation_pool(records: list[dict[str, Any]], source: str = "data") -> list[Passage]:
    """Each dev question's first positive plus all its hard and plain negatives, each passage once.

    The paper's code appended duplicates (its drop_duplicates result was never assigned); a
    duplicated passage would occupy several ranks. `pool_with_duplicates` counts what it indexed.
    """
    pool: dict[str, Passage] = {}
    for passage in _pool_entries(records, source):
        pool.setdefault(passage.passage_id, passage)
    return list(pool.values())


def pool_with_duplicates(records: list[dict[str, Any]], source: str = "data") -> int:
    """The evaluation pool's size before de-duplication: what the paper reports (935,159 on NQ dev)."""
    return sum(1 for _ in _pool_entries(records, source))


def _pool_entries(records: list[dict[str, Any]], source: str):
    for i, record in enumerate(records):
        positives = _contexts(record, "positive_ctxs", source, i)
        if positives:
            yield from positives[:1] + _contexts(record, "hard_negative_ctxs", source, i) + _contexts(record, "negative_ctxs", source, i)


def _question(record: dict[str, Any], source: str, index: int) -> str:
    question = record.get("question") if isinstance(record, dict) else None
    if not isinstance(question, str):
        raise DataFormatError(f"{source}: record {index}: expected a 'question' string")
    return question


def _contexts(record: dict[str, Any], key: str, source: str, index: int) -> list[Passage]:
    raw = record.get(key) or []
    passages = []
    for j, ctx in enumerate(raw):
        pid = ctx.get("passage_id", ctx.get("psg_id")) if isinstance(ctx, dict) else None
        if pid is None or "text" not in ctx:
            raise DataFormatError(f"{source}: record {index}: {key}[{j}]: expected 'passage_id' and 'text'")
        passages.append(Passage(str(pid), str(ctx.get("title", "")), str(ctx["text"])))
    return passages
