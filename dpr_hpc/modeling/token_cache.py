"""Tokenize once per tokenizer: a grid's cells share tokenized data through this cache.

The paper's 28 cells use 4 tokenizers, so the data is tokenized 4 times, not 28 (and the
index and infer stages of a trained cell reuse what its training tokenized for the dev set).
An entry is keyed by what was tokenized (which texts of which data file, by content hash), the
tokenizer (a hash of its full definition) and the settings (maximum length, titles). Jobs that
need the same entry at once build it once: the first holds a file lock, the rest wait and read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from dpr_hpc.fsutil import read_json, write_json_atomic
from dpr_hpc.modeling.batching import TokenizedTexts


@dataclass(frozen=True)
class Lookup:
    texts: TokenizedTexts
    hit: bool
    key: str


class TokenCache:
    def __init__(self, folder: Path | None) -> None:
        """`folder=None` disables caching (every call tokenizes)."""
        self.folder = folder

    def get(self, what: str, data_file: Path, tokenizer, settings: dict, build: Callable[[], TokenizedTexts]) -> Lookup:
        key = self.key(what, data_file, tokenizer, settings)
        if self.folder is None:
            return Lookup(build(), False, key)
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = self.folder / f"{what}-{key}.npz"
        with FileLock(str(entry) + ".lock"):
            if entry.is_file():
                try:
                    return Lookup(TokenizedTexts.load(entry), True, key)
                except (OSError, ValueError, KeyError):
                    entry.unlink(missing_ok=True)  # unreadable: build it again
            texts = build()
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            texts.save(tmp)
            os.replace(tmp, entry)
            return Lookup(texts, False, key)

    def key(self, what: str, data_file: Path, tokenizer, settings: dict) -> str:
        identity = {"what": what, "data": self.file_sha256(data_file), "tokenizer": tokenizer_fingerprint(tokenizer), **settings}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def file_sha256(self, path: Path) -> str:
        """A data file's content hash, remembered by (path, size, mtime) so that a multi-GB
        training file is read for hashing once, and a changed file is hashed again."""
        stat = path.stat()
        stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        memo_file = self.folder / "file-hashes.json" if self.folder else None
        if memo_file is not None:
            with FileLock(str(memo_file) + ".lock"):
                memo = read_json(memo_file) if memo_file.is_file() else {}
                if stamp not in memo:
                    memo[stamp] = _sha256(path)
                    write_json_atomic(memo_file, memo)
                return memo[stamp]
        return _sha256(path)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides a tokenizer's output: for fast tokenizers their full
    serialized definition (vocabulary, normalizer, pre-tokenizer, post-processor)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the truncation and padding state, which the last call to the tokenizer set.
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        definition = json.dumps(spec, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    definition += type(tokenizer).__name__
    return hashlib.sha256(definition.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
