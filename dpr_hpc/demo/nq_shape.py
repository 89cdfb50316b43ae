"""DPR-format train and dev files shaped like Natural Questions', written with no download.

The content is random pseudo-words; what matches NQ is the shape the stages' cost depends on:
how many records, how many contexts each, how long each text is, and how often one passage
appears in several records. See README, *Paper-scale data*, for each figure and its source.

Files are written record by record (never held whole in memory): a passage's words are a slice
of one fixed pseudo-random word stream, chosen by its id, so the same id always has the same
title and text wherever it recurs, without remembering any passage.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dpr_hpc.fsutil import write_file_atomic

# Issue 14 / the paper / DPR's biencoder-nq-{train,dev}.json.
NQ_TRAIN_QUESTIONS = 58_880
NQ_DEV_QUESTIONS = 6_515
NQ_DEV_POOL_WITH_DUPLICATES = 935_159  # first positive + hard + plain negatives of every dev question
PLAIN_NEGATIVES = 50
TRAIN_HARD_NEGATIVES = 30
PASSAGE_WORDS = 100  # DPR's Wikipedia passages are 100-word blocks
QUESTION_WORDS = (9, 10)

# Assumptions (README says so): shapes NQ's description does not pin down.
SHORT_PASSAGE_SHARE = 1 / 16  # an article's last block is shorter: 30-99 words
FULL_HARD_SHARE = 0.9  # a train question has 30 hard negatives, else 0-29
EXTRA_POSITIVES_P = 0.5  # positives: 1 + geometric extra ones (mean 2), at most 10
MAX_POSITIVES = 10
REUSE_SHARE = 0.15  # a negative is a passage already used by an earlier record
DEV_ID_BASE = 50_000_000  # dev passage ids apart from train's, so the two files are independent

VOCABULARY_SIZE = 20_000
ZIPF_OFFSET = 40
WORD_STREAM_SIZE = 1 << 20
SYLLABLES = ("ka", "lo", "mi", "ze", "ru", "tan", "vor", "el", "dri", "so", "quin", "bar", "fe", "nu", "gal",
             "to", "shi", "por", "da", "wen", "an", "the", "is", "of", "in", "re", "con", "ment", "ly", "er")


@dataclass(frozen=True)
class SplitShape:
    """How many of each a split's records hold: arrays with one entry per record."""

    positives: np.ndarray
    hard: np.ndarray
    plain: np.ndarray

    @property
    def contexts(self) -> int:
        return int(self.positives.sum() + self.hard.sum() + self.plain.sum())

    @property
    def pool_with_duplicates(self) -> int:
        """What the index stage would index: each record's first positive, hard and plain negatives."""
        return int(len(self.positives) + self.hard.sum() + self.plain.sum())


def write_nq_shaped(out_dir: Path, fraction: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Write train.json and dev.json under out_dir, `fraction` of NQ's size; returns per split
    its records, contexts, pool size with duplicates and file bytes."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = PassageTexts(seed)
    summary: dict[str, Any] = {"fraction": fraction, "seed": seed}
    for split, shape, id_base in (("train", train_shape(rng, fraction), 0), ("dev", dev_shape(rng, fraction), DEV_ID_BASE)):
        path = out_dir / f"{split}.json"
        digest = write_file_atomic(path, lambda tmp: _write_records(tmp, shape, id_base, texts, rng))
        summary[split] = {"records": len(shape.positives), "contexts": shape.contexts,
                          "pool_with_duplicates": shape.pool_with_duplicates, "bytes": digest.size, "path": str(path)}
    return summary


def train_shape(rng: np.random.Generator, fraction: float) -> SplitShape:
    n = max(1, round(NQ_TRAIN_QUESTIONS * fraction))
    full = rng.random(n) < FULL_HARD_SHARE
    hard = np.where(full, TRAIN_HARD_NEGATIVES, rng.integers(0, TRAIN_HARD_NEGATIVES, n))
    return SplitShape(_positives(rng, n), hard.astype(np.int64), np.full(n, PLAIN_NEGATIVES, dtype=np.int64))


def dev_shape(rng: np.random.Generator, fraction: float) -> SplitShape:
    """Dev questions with 50 plain negatives each and as many hard negatives as bring the pool to
    NQ's 935,159 (scaled): 92.5 a question on average, spread evenly (an assumption)."""
    n = max(1, round(NQ_DEV_QUESTIONS * fraction))
    pool = max(n * (1 + PLAIN_NEGATIVES), round(NQ_DEV_POOL_WITH_DUPLICATES * fraction))
    hard = rng.multinomial(pool - n * (1 + PLAIN_NEGATIVES), np.full(n, 1.0 / n))
    return SplitShape(_positives(rng, n), hard.astype(np.int64), np.full(n, PLAIN_NEGATIVES, dtype=np.int64))


def _positives(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.minimum(rng.geometric(1 - EXTRA_POSITIVES_P, n), MAX_POSITIVES).astype(np.int64)


class PassageTexts:
    """Title and text of a passage id, the same every time the id recurs: a slice of one fixed
    word stream at an offset drawn from the id."""

    def __init__(self, seed: int) -> None:
        words = _vocabulary(seed)
        # Zipf-like frequencies over words sorted by length: short words are the common ones, as in
        # English, which brings a 100-word passage to about 600 characters like NQ's.
        weights = 1.0 / (np.arange(len(words)) + ZIPF_OFFSET)
        stream = np.random.default_rng(seed + 1).choice(len(words), WORD_STREAM_SIZE, p=weights / weights.sum())
        self.stream = [words[i] for i in stream.tolist()]

    def passage(self, passage_id: int) -> tuple[str, str]:
        mix = (passage_id * 0x9E3779B1) & 0xFFFFFFFF
        start = mix % (WORD_STREAM_SIZE - 2 * PASSAGE_WORDS)
        length = PASSAGE_WORDS if mix % 997 >= 997 * SHORT_PASSAGE_SHARE else 30 + mix % 70
        title_words = 1 + (mix >> 8) % 4
        title = " ".join(self.stream[start + length : start + length + title_words]).title()
        return title, " ".join(self.stream[start : start + length])

    def question(self, rng: np.random.Generator) -> str:
        start = int(rng.integers(0, WORD_STREAM_SIZE - 16))
        return " ".join(self.stream[start : start + int(rng.choice(QUESTION_WORDS))]) + "?"


def _vocabulary(seed: int) -> list[str]:
    chooser = random.Random(seed)
    words: set[str] = set()
    while len(words) < VOCABULARY_SIZE:
        words.add("".join(chooser.choice(SYLLABLES) for _ in range(chooser.randint(1, 3))))
    return sorted(words, key=lambda w: (len(w), w))


def _write_records(path: Path, shape: SplitShape, id_base: int, texts: PassageTexts, rng: np.random.Generator) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("[\n")
        for i, record in enumerate(_records(shape, id_base, texts, rng)):
            if i:
                handle.write(",\n")
            json.dump(record, handle, ensure_ascii=False)
        handle.write("\n]\n")


def _records(shape: SplitShape, id_base: int, texts: PassageTexts, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """DPR's record layout and key order; positives are new passages, each negative is new or,
    with REUSE_SHARE, one an earlier record used (which makes the pool's duplicates)."""
    next_id = id_base
    for positives, hard, plain in zip(shape.positives.tolist(), shape.hard.tolist(), shape.plain.tolist()):
        first_of_record = next_id
        positive_ids = list(range(next_id, next_id + positives))
        next_id += positives
        negatives = hard + plain
        reuse = rng.random(negatives) < REUSE_SHARE if first_of_record > id_base else np.zeros(negatives, dtype=bool)
        earlier = rng.integers(id_base, max(first_of_record, id_base + 1), negatives)
        fresh = np.arange(next_id, next_id + negatives)
        next_id += negatives
        negative_ids = np.where(reuse, earlier, fresh).tolist()
        scores = rng.random(negatives) * 20
        gold_text = texts.passage(positive_ids[0])[1]
        answer_at = int(rng.integers(0, 8))
        yield {
            "dataset": "nq_shaped",
            "question": texts.question(rng),
            "answers": [" ".join(gold_text.split(" ")[answer_at : answer_at + 1 + answer_at % 3])],
            "positive_ctxs": [_context(texts, pid, 1000.0, 1) for pid in positive_ids],
            "negative_ctxs": [_context(texts, pid, float(s), 0) for pid, s in zip(negative_ids[hard:], scores[hard:].tolist())],
            "hard_negative_ctxs": [_context(texts, pid, float(s), 0) for pid, s in zip(negative_ids[:hard], scores[:hard].tolist())],
        }


def _context(texts: PassageTexts, passage_id: int, score: float, title_score: int) -> dict[str, Any]:
    title, text = texts.passage(passage_id)
    return {"title": title, "text": text, "score": round(score, 4), "title_score": title_score, "passage_id": str(passage_id)}
