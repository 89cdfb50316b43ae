"""Prepared data: each DPR data file parsed once per content, kept as columns read in place.

NQ's training file is several GB of JSON; `json.load` of it costs over 10 GB of Python objects
and minutes, in every train job and every requeue. Here the first job to need a file streams it
(dpr_hpc.inputs.data.iter_records) into the columns the stages read, and every later job, requeue or
repeat maps them in well under a second. An entry is named by the file's content hash, so an
edited file is prepared again and an unchanged one is never re-read:

    <runs root>/cache/prepared/<sha256[:16]>-<kind>-v<format>/
        manifest.json          the file it was read from, its sha256, the parser, counts, build time
        <column>.bin           a string column: every value's UTF-8 bytes, concatenated
                               (raw bytes: np.memmap(..., dtype=np.uint8) maps one)
        <column>.offsets.npy   int64, value i is bin[offsets[i]:offsets[i + 1]] (memory-mapped)
        <name>.npy             an integer column (memory-mapped)

A dev entry's pool is stored once per passage id (first seen first), and `pool_rows.npy` maps
each pool entry of the file, duplicates included and in file order, to its row there: the pool
the paper's code indexed is that table seen through those rows (`PreparedDev.pool_entries`).

Opening an entry reads no text: the offsets and integer columns are mapped, and a string is
read from its .bin file when it is asked for (see StringColumn).

Jobs that need the same entry at once build it once: the builder holds a lock file (the token
cache's kind, with a heartbeat), the rest wait and map. An entry is built in a temporary folder
and renamed into place, so a reader sees a complete entry or none; one that does not open all
the same (a lost file, offsets that do not fit) is built again with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from abc import abstractmethod
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence, TypeVar

import numpy as np

from dpr_hpc.errors import DataChangedError
from dpr_hpc.inputs.content import ContentHashes
from dpr_hpc.inputs.data import (FAST_JSON_PARSER, DevQuestion, Passage, TrainingExample, dev_entry, iter_records, json_parser_backend,
                          training_example)
from dpr_hpc.fsutil import atomic_folder, read_json, write_json_atomic
from dpr_hpc.locks import HEARTBEAT_S, LockFile
from dpr_hpc.provenance import now_iso

log = logging.getLogger(__name__)
# Per kind, so that a change to one kind's columns leaves the other's entries in place.
# dev 2: the pool's entries with duplicates (pool_rows.npy).
PREPARED_FORMAT = {"train": 1, "dev": 2}
TEXT_ERRORS = "surrogatepass"  # JSON may escape lone surrogates; they round-trip
WRITE_BUFFER = 1 << 20
# What opening a damaged entry raises: a missing file, a bad .npy, a manifest that is not JSON
# or lacks a key, columns that do not fit together.
DAMAGED_ENTRY = (OSError, ValueError, KeyError, TypeError)


Row = TypeVar("Row")


class _LazyRows(Sequence[Row]):
    """A sequence that reads row i only when asked; a slice is the list of the rows it selects."""

    @abstractmethod
    def _read(self, i: int) -> Row:
        """Row i, 0 <= i < len(self)."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._read(j) for j in range(*i.indices(len(self)))]
        return self._read(_index(i, len(self)))


class StringColumn(_LazyRows[str]):
    """Strings stored as concatenated UTF-8 plus offsets; a value becomes a Python str only when
    it is read, so a million passages cost their bytes on disk, not a million objects.

    The offsets are memory-mapped; a value's bytes are read with one positional read, not
    through a mapping: mapped pages count in the job's RSS (and in SLURM's MaxRSS) for as long
    as they stay mapped, and reading each example's first negative from a mapped 1 GB column
    touched nearly all of it (measured: RssFile 1.1 GB against 20 MB of the process's own).
    """

    def __init__(self, bin_file: Path, offsets: np.ndarray) -> None:
        size = bin_file.stat().st_size
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != size:
            raise ValueError(f"{bin_file}: the string offsets do not index its {size} bytes")
        self.bin_file = bin_file
        self.offsets = offsets
        self._handle = bin_file.open("rb", buffering=0)  # closed with the column

    @classmethod
    def open(cls, folder: Path, name: str) -> "StringColumn":
        return cls(folder / f"{name}.bin", np.load(folder / f"{name}.offsets.npy", mmap_mode="r"))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _read(self, i: int) -> str:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return os.pread(self._handle.fileno(), end - start, start).decode("utf-8", TEXT_ERRORS)

    def fixed_width_bytes(self) -> np.ndarray:
        """Every value as one NumPy fixed-width bytes array (dtype S<longest>), built without a
        Python object per value: a million passage ids are ~10 MB, not a list of strings."""
        data = np.fromfile(self.bin_file, dtype=np.uint8)
        lengths = np.diff(self.offsets)
        width = max(int(lengths.max(initial=0)), 1)
        table = np.zeros((len(self), width), dtype=np.uint8)
        rows = np.repeat(np.arange(len(self)), lengths)
        columns = np.arange(len(data)) - np.repeat(np.asarray(self.offsets[:-1]), lengths)
        table[rows, columns] = data
        return table.view(f"S{width}").reshape(len(self))


@dataclass(frozen=True)
class PassageTable(_LazyRows[Passage]):
    """Passages as three string columns, optionally seen through a row selection (`take`)."""

    ids: StringColumn
    titles: StringColumn
    texts: StringColumn
    rows: np.ndarray | None = None

    @classmethod
    def open(cls, folder: Path, prefix: str) -> "PassageTable":
        table = cls(*(StringColumn.open(folder, f"{prefix}_{part}") for part in PASSAGE_PARTS))
        if not len(table.ids) == len(table.titles) == len(table.texts):
            raise ValueError(f"{folder}: the {prefix} columns differ in length")
        return table

    def __len__(self) -> int:
        return len(self.ids) if self.rows is None else len(self.rows)

    def text(self, i: int) -> str:
        """Row i's text alone (one read, where a Passage takes three)."""
        i = _index(i, len(self))
        return self.texts[i if self.rows is None else int(self.rows[i])]

    def id_bytes(self) -> np.ndarray:
        """The passage ids in this table's row order as fixed-width bytes (StringColumn's)."""
        ids = self.ids.fixed_width_bytes()
        return ids if self.rows is None else ids[self.rows]

    def take(self, rows: np.ndarray) -> "PassageTable":
        """The passages at `rows` (of this table), in that order; nothing is read."""
        rows = np.asarray(rows, dtype=np.int64)
        return PassageTable(self.ids, self.titles, self.texts, rows if self.rows is None else self.rows[rows])

    def _read(self, i: int) -> Passage:
        row = i if self.rows is None else int(self.rows[i])
        return Passage(self.ids[row], self.titles[row], self.texts[row])


PASSAGE_PARTS = ("id", "title", "text")


@dataclass(frozen=True)
class PreparedTrain:
    """The training examples: one per question with a positive, as dpr_hpc.inputs.data.training_example
    makes them; example i's negatives (its hard ones, else its plain ones) are
    `negatives[negative_offsets[i]:negative_offsets[i + 1]]`."""

    folder: Path
    hit: bool
    manifest: dict[str, Any]
    questions: StringColumn
    positives: PassageTable
    negatives: PassageTable
    negative_offsets: np.ndarray
    load_s: float = 0.0

    @classmethod
    def open(cls, folder: Path, hit: bool, manifest: dict[str, Any]) -> "PreparedTrain":
        offsets = np.load(folder / "negative_offsets.npy", mmap_mode="r")
        prepared = cls(folder, hit, manifest, StringColumn.open(folder, "questions"), PassageTable.open(folder, "positive"),
                       PassageTable.open(folder, "negative"), offsets)
        if not len(prepared.questions) == len(prepared.positives) == len(offsets) - 1 == manifest["examples"]:
            raise ValueError(f"{folder}: questions, positives and negative offsets differ in length")
        if offsets[-1] != len(prepared.negatives):
            raise ValueError(f"{folder}: the negative offsets do not index the negatives")
        return prepared

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def negative_counts(self) -> np.ndarray:
        return np.diff(self.negative_offsets)

    def example(self, i: int) -> TrainingExample:
        start, end = int(self.negative_offsets[i]), int(self.negative_offsets[i + 1])
        return TrainingExample(self.questions[i], self.positives[i], tuple(self.negatives[start:end]))


@dataclass(frozen=True)
class PreparedDev:
    """The dev questions (those with a positive) and the de-duplicated evaluation pool (each
    question's first positive, hard and plain negatives, each passage id once, first seen first);
    `pool_rows` maps every pool entry of the file, duplicates included, to its row of `pool`."""

    folder: Path
    hit: bool
    manifest: dict[str, Any]
    questions: StringColumn
    gold_ids: StringColumn
    record_index: np.ndarray
    answers: StringColumn
    answer_offsets: np.ndarray
    pool: PassageTable
    pool_rows: np.ndarray
    load_s: float = 0.0
    _questions: list[DevQuestion] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def open(cls, folder: Path, hit: bool, manifest: dict[str, Any]) -> "PreparedDev":
        prepared = cls(folder, hit, manifest, StringColumn.open(folder, "questions"), StringColumn.open(folder, "gold_ids"),
                       np.load(folder / "record_index.npy", mmap_mode="r"), StringColumn.open(folder, "answers"),
                       np.load(folder / "answer_offsets.npy", mmap_mode="r"), PassageTable.open(folder, "pool"),
                       np.load(folder / "pool_rows.npy", mmap_mode="r"))
        n = manifest["questions"]
        if not len(prepared.questions) == len(prepared.gold_ids) == len(prepared.record_index) == len(prepared.answer_offsets) - 1 == n:
            raise ValueError(f"{folder}: the question columns differ in length")
        if prepared.answer_offsets[-1] != len(prepared.answers) or len(prepared.pool) != manifest["pool"]:
            raise ValueError(f"{folder}: answers or pool do not match the manifest")
        rows = prepared.pool_rows
        if len(rows) != manifest["pool_with_duplicates"] or (len(rows) and not 0 <= rows.min() <= rows.max() < len(prepared.pool)):
            raise ValueError(f"{folder}: the pool's entry rows do not index its pool")
        return prepared

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def pool_with_duplicates(self) -> int:
        """The pool's size before de-duplication: what the paper reports (935,159 on NQ dev)."""
        return int(self.manifest["pool_with_duplicates"])

    @property
    def pool_entries(self) -> PassageTable:
        """Every pool entry in file order, duplicates included: the pool the paper's code indexed."""
        return self.pool.take(self.pool_rows)

    def indexed_pool(self, deduplicate: bool) -> PassageTable:
        """The passages an index holds, one per row: each id once (`index.deduplicate: true`),
        or every entry (false)."""
        return self.pool if deduplicate else self.pool_entries

    def question(self, i: int) -> DevQuestion:
        start, end = int(self.answer_offsets[i]), int(self.answer_offsets[i + 1])
        return DevQuestion(self.questions[i], tuple(self.answers[start:end]), self.gold_ids[i], int(self.record_index[i]))

    def dev_questions(self) -> list[DevQuestion]:
        """Every dev question as an object (thousands, not the pool's million)."""
        if not self._questions:
            self._questions.extend(self.question(i) for i in range(len(self)))
        return self._questions


Prepared = TypeVar("Prepared", PreparedTrain, PreparedDev)


def load_train(path: Path, cache_dir: Path) -> PreparedTrain:
    """The training file's examples, mapped from `cache_dir` (built there first if absent)."""
    return _load(Path(path), Path(cache_dir), "train", _build_train, PreparedTrain.open)


def load_dev(path: Path, cache_dir: Path) -> PreparedDev:
    """The dev file's questions and evaluation pool, mapped from `cache_dir` (built first if absent)."""
    return _load(Path(path), Path(cache_dir), "dev", _build_dev, PreparedDev.open)


def entry_folder(cache_dir: Path, sha256: str, kind: str) -> Path:
    return cache_dir / f"{sha256[:16]}-{kind}-v{PREPARED_FORMAT[kind]}"


def holds(cache_dir: Path, sha256: str, kind: str) -> bool:
    """Whether a complete entry of this content is here: a data file purged from scratch after
    it was prepared is still known by its content. Only a missing entry (ENOENT) or a damaged
    manifest is "not held"; any other read error is raised."""
    try:
        manifest = read_json(entry_folder(Path(cache_dir), sha256, kind) / "manifest.json")
    except FileNotFoundError:
        return False
    except ValueError:
        return False
    return isinstance(manifest, dict) and manifest.get("format") == PREPARED_FORMAT[kind] and manifest.get("sha256") == sha256


def data_file_sha256(path: Path, cache_dir: Path, handle: BinaryIO) -> str:
    """The content hash of the file open as `handle` (the one that will be parsed) through the
    content-hash memo (dpr_hpc.inputs.content), kept in the cache: a multi-GB file is hashed once,
    and again only when it may have changed."""
    hashes = ContentHashes(cache_dir / "content-hashes.json")
    digest = hashes.opened(path, handle)
    hashes.save()
    return digest


def _load(path: Path, cache_dir: Path, kind: str, build: Callable[[Path, BinaryIO, Path], dict[str, Any]],
          open_entry: Callable[[Path, bool, dict[str, Any]], Prepared]) -> Prepared:
    """The file is opened once, and that one open file is hashed and, if its entry must be
    built, parsed: a file moved over `path` in between (a `mv` of new data into place) can
    then not be filed under the old content's hash."""
    started = time.perf_counter()
    with path.open("rb") as handle:
        sha256 = data_file_sha256(path, cache_dir, handle)
        folder = entry_folder(cache_dir, sha256, kind)
        try:
            prepared = _open(folder, kind, sha256, True, open_entry)
        except DAMAGED_ENTRY:
            prepared = None  # absent or damaged: decided again under the lock
        if prepared is None:
            with LockFile(folder.with_name(folder.name + ".lock"), purpose=f"preparing {path.name} ({kind})",
                          heartbeat_s=HEARTBEAT_S, timeout_s=math.inf):
                prepared = _open_or_build(path, handle, folder, kind, sha256, build, open_entry)
    return dataclasses.replace(prepared, load_s=time.perf_counter() - started)


def _open_or_build(path: Path, handle: BinaryIO, folder: Path, kind: str, sha256: str, build, open_entry) -> Prepared:
    """Under the lock: another job may have built it while this one waited."""
    if folder.exists():
        try:
            return _open(folder, kind, sha256, True, open_entry)
        except DAMAGED_ENTRY as exc:
            log.warning("prepared data: %s is damaged (%s: %s); preparing %s again", folder, type(exc).__name__, exc, path)
    parser = json_parser_backend()
    if parser != FAST_JSON_PARSER:
        # Slower, not wrong, and paid once per file: a warning and the manifest say so.
        log.warning("prepared data: ijson's C backend %s is not installed here; parsing %s with %s, more than 10 times slower",
                    FAST_JSON_PARSER, path, parser)
    began = time.perf_counter()
    hashed = os.fstat(handle.fileno())
    with atomic_folder(folder) as tmp:
        counts = build(path, handle, tmp)
        if _changed(hashed, os.fstat(handle.fileno())):
            raise DataChangedError(f"{path}: written to while it was being prepared (its hash no longer names what was read); "
                                   "run the job again once the file is complete")
        manifest = {"format": PREPARED_FORMAT[kind], "kind": kind, "source": str(path.resolve()), "sha256": sha256,
                    "parser": parser, "built_at": now_iso(), "built_by": f"{socket.gethostname()}:{os.getpid()}",
                    "build_s": round(time.perf_counter() - began, 3), **counts}
        write_json_atomic(tmp / "manifest.json", manifest)
    return _open(folder, kind, sha256, False, open_entry)


def _open(folder: Path, kind: str, sha256: str, hit: bool, open_entry) -> Prepared | None:
    if not folder.exists():
        return None
    manifest = read_json(folder / "manifest.json")
    if manifest.get("format") != PREPARED_FORMAT[kind] or manifest.get("kind") != kind or manifest.get("sha256") != sha256:
        raise ValueError(f"{folder}: manifest of another entry ({manifest.get('kind')}, format {manifest.get('format')})")
    return open_entry(folder, hit, manifest)


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (after.st_size, after.st_mtime_ns, after.st_ctime_ns)


def _build_train(path: Path, handle: BinaryIO, folder: Path) -> dict[str, Any]:
    questions = _StringWriter(folder, "questions")
    positives, negatives = _PassageWriter(folder, "positive"), _PassageWriter(folder, "negative")
    negative_counts = array("q")
    records = 0
    for index, record in enumerate(iter_records(path, handle)):
        records += 1
        example = training_example(record, str(path), index)
        if example is None:
            continue
        questions.add(example.question)
        positives.add(example.positive)
        for negative in example.negatives:
            negatives.add(negative)
        negative_counts.append(len(example.negatives))
    for writer in (questions, positives, negatives):
        writer.close()
    np.save(folder / "negative_offsets.npy", _offsets(negative_counts))
    return {"records": records, "examples": len(negative_counts), "negatives": int(sum(negative_counts))}


def _build_dev(path: Path, handle: BinaryIO, folder: Path) -> dict[str, Any]:
    questions, gold_ids, answers = (_StringWriter(folder, name) for name in ("questions", "gold_ids", "answers"))
    pool = _PassageWriter(folder, "pool")
    record_index, answer_counts = array("q"), array("q")
    seen: dict[str, int] = {}  # the pool's ids and rows: the one per-passage Python object the build keeps
    pool_rows = array("q")
    records = with_duplicates = 0
    for index, record in enumerate(iter_records(path, handle)):
        records += 1
        entry = dev_entry(record, str(path), index)
        if entry is None:
            continue
        question, passages = entry
        questions.add(question.question)
        gold_ids.add(question.gold_id)
        record_index.append(question.record_index)
        for answer in question.answers:
            answers.add(answer)
        answer_counts.append(len(question.answers))
        with_duplicates += len(passages)
        for passage in passages:
            if passage.passage_id not in seen:
                seen[passage.passage_id] = len(seen)
                pool.add(passage)
            pool_rows.append(seen[passage.passage_id])
    for writer in (questions, gold_ids, answers, pool):
        writer.close()
    np.save(folder / "record_index.npy", np.frombuffer(record_index, dtype=np.int64) if record_index else np.zeros(0, np.int64))
    np.save(folder / "answer_offsets.npy", _offsets(answer_counts))
    np.save(folder / "pool_rows.npy", np.frombuffer(pool_rows, dtype=np.int64) if pool_rows else np.zeros(0, np.int64))
    return {"records": records, "questions": len(record_index), "pool": len(seen), "pool_with_duplicates": with_duplicates}


class _StringWriter:
    """Appends strings to a column's .bin file as they come; only their lengths stay in memory."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.handle = (folder / f"{name}.bin").open("wb", buffering=WRITE_BUFFER)
        self.lengths = array("q")

    def add(self, value: str) -> None:
        encoded = value.encode("utf-8", TEXT_ERRORS)
        self.handle.write(encoded)
        self.lengths.append(len(encoded))

    def close(self) -> None:
        self.handle.close()
        np.save(self.folder / f"{self.name}.offsets.npy", _offsets(self.lengths))


class _PassageWriter:
    def __init__(self, folder: Path, prefix: str) -> None:
        self.columns = [_StringWriter(folder, f"{prefix}_{part}") for part in PASSAGE_PARTS]

    def add(self, passage: Passage) -> None:
        for column, value in zip(self.columns, (passage.passage_id, passage.title, passage.text)):
            column.add(value)

    def close(self) -> None:
        for column in self.columns:
            column.close()


def _offsets(lengths: array) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
    return offsets


def _index(i: int, length: int) -> int:
    i = int(i)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"row {i} out of range for {length}")
    return i
