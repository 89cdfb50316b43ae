"""A retrieval corpus in DPR's formats: passages (psgs_w100.tsv) and questions (nq-test.qa.csv).

    passages   TAB-separated `id, text, title`, one passage a line, a header line `id text title`
               first; a field may be double-quoted with "" inside (csv's excel-tab dialect, which
               DPR's readers use), never across lines.
    questions  `question TAB answers`, no header, answers a Python list literal of strings
               (['Paris', 'Paris, France']). Ours: an optional third column names the gold
               passage ids (a list literal, or one id), for MRR where they are known.

A shard is a byte range of the passages file: shard i of N holds the lines that *start* in
[i*size/N, (i+1)*size/N). A task finds its lines by seeking, so no task reads the whole 13 GB
file, and every line lands in exactly one shard however N is chosen. A passage's global id is
the byte offset of its line: unique, ordered as the file is, the same however the corpus was
cut, and enough to read the passage back at merge time with one seek.

DPR's generate_dense_embeddings.py instead loads every passage and cuts `ceil(rows / num_shards)`
rows per shard: equal row counts, where byte ranges give near-equal bytes (row counts differ a
little between shards).
"""

from __future__ import annotations

import ast
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from dpr_hpc.errors import DprHpcError
from dpr_hpc.inputs.data import Passage

HEADER_FIRST_FIELD = "id"


class CorpusFormatError(DprHpcError):
    """A corpus file that is not in DPR's format: the message names the file and the line."""

    exit_code = 2


@dataclass(frozen=True)
class ShardPassages:
    """One shard's passages in file order, with each one's byte offset (its global id)."""

    passages: list[Passage]
    offsets: np.ndarray  # int64, ascending

    def __len__(self) -> int:
        return len(self.passages)


def shard_range(size: int, shards: int, shard: int) -> tuple[int, int]:
    """The bytes whose lines shard `shard` of `shards` holds: [begin, end)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}")
    return size * shard // shards, size * (shard + 1) // shards


def read_shard(path: Path, shards: int, shard: int) -> ShardPassages:
    """The passages whose lines start inside the shard's byte range."""
    path = Path(path)
    begin, end = shard_range(path.stat().st_size, shards, shard)
    passages: list[Passage] = []
    offsets: list[int] = []
    with path.open("rb") as handle:
        for offset, line in _lines_from(handle, begin, end):
            row = parse_passage_line(line, path, offset)
            if row is not None:
                passages.append(row)
                offsets.append(offset)
    return ShardPassages(passages, np.asarray(offsets, dtype=np.int64))


def _lines_from(handle: BinaryIO, begin: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for each line starting in [begin, end): a line that starts before
    `begin` belongs to the shard before."""
    if begin > 0:
        handle.seek(begin - 1)
        handle.readline()  # to the end of the line holding byte begin-1: the next line starts >= begin
    position = handle.tell()
    while position < end:
        line = handle.readline()
        if not line:
            return
        yield position, line
        position += len(line)


def parse_passage_line(line: bytes, path: Path, offset: int) -> Passage | None:
    """One line as a Passage; None for the header line or a blank line."""
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise CorpusFormatError(f"{path}: byte {offset + exc.start}: not valid UTF-8") from None
    if not text:
        return None
    fields = next(csv.reader([text], dialect="excel-tab"))
    if len(fields) != 3:
        raise CorpusFormatError(f"{path}: the line at byte {offset} has {len(fields)} fields; expected DPR's passages format, "
                                "3 TAB-separated fields: id, text, title (header: id text title)")
    if offset == 0 and fields[0] == HEADER_FIRST_FIELD:
        return None
    return Passage(passage_id=fields[0], title=fields[2], text=fields[1])


def read_passages_at(path: Path, offsets: Sequence[int]) -> dict[int, Passage]:
    """The passages at these byte offsets (each read once, in file order: one seek each)."""
    found: dict[int, Passage] = {}
    with Path(path).open("rb") as handle:
        for offset in sorted({int(o) for o in offsets if o >= 0}):
            handle.seek(offset)
            passage = parse_passage_line(handle.readline(), Path(path), offset)
            if passage is None:
                raise CorpusFormatError(f"{path}: no passage at byte {offset}; the file changed since it was encoded")
            found[offset] = passage
    return found


@dataclass(frozen=True)
class CorpusQuestion:
    question: str
    answers: tuple[str, ...]
    gold_ids: tuple[str, ...] = ()  # ours: the optional third column


def read_questions(path: Path) -> list[CorpusQuestion]:
    """Every question of a DPR qa file; an error names the file, the line and what was expected."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusFormatError(f"{path}: byte {exc.start}: not valid UTF-8") from None
    questions = []
    for number, fields in enumerate(csv.reader(io.StringIO(text), dialect="excel-tab"), start=1):
        if not fields or fields == [""]:
            continue
        if len(fields) not in (2, 3):
            raise CorpusFormatError(f"{path}: line {number} has {len(fields)} fields; expected DPR's questions format: "
                                    "question TAB a list of answers (['a', 'b']), optionally TAB gold passage ids")
        answers = _string_list(fields[1], path, number, "answers")
        gold = _string_list(fields[2], path, number, "gold passage ids") if len(fields) == 3 and fields[2].strip() else ()
        questions.append(CorpusQuestion(fields[0], answers, gold))
    if not questions:
        raise CorpusFormatError(f"{path}: no questions; expected DPR's questions format: question TAB a list of answers")
    return questions


def _string_list(field: str, path: Path, number: int, what: str) -> tuple[str, ...]:
    """A Python list literal of strings (DPR writes them so), or one bare string."""
    field = field.strip()
    if not field.startswith("["):
        return (field,)
    try:
        value = ast.literal_eval(field)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CorpusFormatError(f"{path}: line {number}: the {what} are not a list of strings: {field[:80]!r}")
    return tuple(value)


def write_passages(path: Path, passages: Sequence[Passage]) -> None:
    """A passages file in DPR's format (the demo's corpus, tests)."""
    with Path(path).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, dialect="excel-tab", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        for p in passages:
            writer.writerow([p.passage_id, p.text, p.title])


def write_questions(path: Path, questions: Sequence[CorpusQuestion]) -> None:
    """A questions file in DPR's format, with our gold column where a question has gold ids."""
    with Path(path).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, dialect="excel-tab", lineterminator="\n")
        for q in questions:
            writer.writerow([q.question, repr(list(q.answers))] + ([repr(list(q.gold_ids))] if q.gold_ids else []))
