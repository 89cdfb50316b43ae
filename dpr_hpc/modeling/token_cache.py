"""Tokenize once per tokenizer: a grid's cells share tokenized data through this cache.

The paper's 28 cells use 4 tokenizers, so the data is tokenized 4 times, not 28 (and the
index and infer stages of a trained cell reuse what its training tokenized for the dev set).
An entry is keyed by what was tokenized (which texts of which data, by the content hash of the
prepared data the texts come from: dpr_hpc.inputs.prepared hashed and parsed the same open file, so
the key names the bytes the tokens were made from, whatever lies at the file's path by now),
the tokenizer (a hash of its full definition) and the settings (maximum length, titles). Jobs
that need the same entry at once build it once: the first holds a lock file (dpr_hpc.locks,
which holds on shared filesystems), the rest wait and read. An entry that does not load,
whatever the damage (a truncated zip, arrays that do not fit together), is built again with a
warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dpr_hpc.fsutil import write_file_atomic
from dpr_hpc.locks import HEARTBEAT_S, LockFile
from dpr_hpc.modeling.batching import TokenizedTexts

log = logging.getLogger(__name__)
# What np.load raises on a damaged .npz, and TokenizedTexts.load on arrays that do not fit.
DAMAGED_ENTRY = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


@dataclass(frozen=True)
class Lookup:
    texts: TokenizedTexts
    hit: bool
    key: str


class TokenCache:
    def __init__(self, folder: Path | None) -> None:
        """`folder=None` disables caching (every call tokenizes)."""
        self.folder = folder

    def get(self, what: str, data_sha256: str, tokenizer, settings: dict, build: Callable[[], TokenizedTexts]) -> Lookup:
        """`build()`'s tokens, which it makes from the data whose content hash is `data_sha256`."""
        key = self.key(what, data_sha256, tokenizer, settings)
        if self.folder is None:
            return Lookup(build(), False, key)
        entry = self._entry(what, key)
        # Building a large entry takes minutes: the heartbeat keeps the waiting jobs from
        # taking the builder's lock for a stale one; a builder that died leaves it stale.
        with _lock(entry, f"tokenizing {entry.name}"):
            if entry.is_file():
                try:
                    return Lookup(TokenizedTexts.load(entry), True, key)
                except DAMAGED_ENTRY as exc:
                    log.warning("token cache: %s is damaged (%s: %s); tokenizing again", entry, type(exc).__name__, exc)
                    entry.unlink(missing_ok=True)
            texts = build()
            write_file_atomic(entry, texts.save)
            return Lookup(texts, False, key)

    def put(self, what: str, data_sha256: str, tokenizer, settings: dict, texts: TokenizedTexts) -> str:
        """Keep tokens made outside the cache (by a timer that must tokenize fresh, the paper's
        PEI) as the entry `get` would have built, unless one is there; returns the key."""
        key = self.key(what, data_sha256, tokenizer, settings)
        if self.folder is not None:
            entry = self._entry(what, key)
            with _lock(entry, f"tokenizing {entry.name}"):
                if not entry.is_file():
                    write_file_atomic(entry, texts.save)
        return key

    def _entry(self, what: str, key: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f"{what}-{key}.npz"

    def key(self, what: str, data_sha256: str, tokenizer, settings: dict) -> str:
        identity = {"what": what, "data": data_sha256, "tokenizer": tokenizer_fingerprint(tokenizer), **settings}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _lock(path: Path, purpose: str) -> LockFile:
    return LockFile(path.with_name(path.name + ".lock"), purpose=purpose, heartbeat_s=HEARTBEAT_S, timeout_s=math.inf)


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

