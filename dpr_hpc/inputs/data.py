"""DPR's biencoder JSON format: training triples, the evaluation passage pool, dev questions.

Each record: {"question", "answers", "positive_ctxs", "negative_ctxs", "hard_negative_ctxs"},
each context {"title", "text", "passage_id"} (DPR's own files sometimes say "psg_id").
Files are read a record at a time (`iter_records`); the stages read them through
dpr_hpc.inputs.prepared, which does that once per file content.
"""

from __future__ import annotations

import codecs
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import ijson

from dpr_hpc.errors import DataFormatError


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


def iter_records(path: Path, handle: BinaryIO | None = None) -> Iterator[dict[str, Any]]:
    """The file's records one at a time, read as UTF-8 (a byte-order mark allowed) with a
    streaming parser: a multi-GB training file never sits in memory as one Python list.
    `handle`: the file already open (read from its start, left open), so that a caller parses
    the very file it hashed even if another is moved over `path` meanwhile."""
    path = Path(path)
    with (path.open("rb") if handle is None else nullcontext(handle)) as handle:
        handle.seek(0)
        start = handle.read(len(codecs.BOM_UTF8))
        if start != codecs.BOM_UTF8:
            handle.seek(0)
        if _first_token(handle) != b"[":
            raise DataFormatError(f"{path}: expected a JSON list of question records")
        try:
            yield from ijson.items(handle, "item", use_float=True)
        except ijson.JSONError as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "invalid bytes in UTF8" in str(exc):
                raise DataFormatError(f"{path}: not valid UTF-8 at byte {first_invalid_utf8_byte(path)}; save it as UTF-8") from None
            raise DataFormatError(f"{path}: not valid JSON: {message}") from None


FAST_JSON_PARSER = "yajl2_c"


def json_parser_backend() -> str:
    """The ijson backend in use: yajl2_c (C) parses NQ's training file in seconds, the
    pure-Python fallback more than 10 times slower (the prepared data records which one read a file)."""
    return ijson.backend


def _first_token(handle: BinaryIO) -> bytes:
    """The first non-blank byte, the stream put back where it was."""
    position = handle.tell()
    head = handle.read(4096).lstrip()
    handle.seek(position)
    return head[:1]


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


def training_example(record: dict[str, Any], source: str, index: int) -> TrainingExample | None:
    """The record's example, None when it has no positive (DPR skips those too)."""
    positives = _contexts(record, "positive_ctxs", source, index)
    if not positives:
        return None
    negatives = _contexts(record, "hard_negative_ctxs", source, index) or _contexts(record, "negative_ctxs", source, index)
    return TrainingExample(_question(record, source, index), positives[0], tuple(negatives))


def dev_entry(record: dict[str, Any], source: str, index: int) -> tuple[DevQuestion, list[Passage]] | None:
    """The record's dev question and what it adds to the evaluation pool (its first positive,
    all its hard and plain negatives); None when it has no positive.

    The pool is de-duplicated by whoever collects it: the paper's code appended duplicates (its
    drop_duplicates result was never assigned), and a duplicated passage would occupy several
    ranks. The count before de-duplication is what the paper reports (935,159 on NQ dev).
    """
    positives = _contexts(record, "positive_ctxs", source, index)
    if not positives:
        return None
    answers = tuple(str(a) for a in record.get("answers", []))
    question = DevQuestion(_question(record, source, index), answers, positives[0].passage_id, index)
    pool = positives[:1] + _contexts(record, "hard_negative_ctxs", source, index) + _contexts(record, "negative_ctxs", source, index)
    return question, pool


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
