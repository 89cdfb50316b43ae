"""Stage identity: a key per stage from what determines its output, and only that.

    train  encoders (local folder content, or hub name and cached revision), embedding size,
           training hyper-parameters, text settings (padding too), training precision, gradient
           cache, train file content
    index  the train key (or, for an evaluation-only cell, the encoders and embedding size),
           text settings, encoding precision and batch size, the index's build settings
           (de-duplication and add batch size too), the PEI timer's boundary, dev file content
    infer  the index key, the search settings (ef_search, top_k) and the ITA timer's boundary

A cell with a `corpus:` also has, per shard i of N, and once for the corpus:
    encode-shard   the train key (the trained passage tower; for an evaluation-only cell the
                   encoders), text settings, encoding precision and batch size, the passages
                   file's content, N and i, the vectors' format on disk
    search-shard   that shard's encode key, the train key (the question tower), the questions
                   file's content, the corpus's top_k and per-shard index (with HNSW its settings)
    merge          every search-shard key, in shard order
None of them enters the train, index or infer keys: a cell evaluated on the dev pool and on a
corpus trains once, and so does a second grid that evaluates the same cell on the dev pool only.

Settings added after stages had keys (text.padding, index.deduplicate, index.add_batch_size,
timing.*) enter a key only when they differ from their defaults, so existing outputs keep theirs.

Two cells, or two grids, that agree on a stage's identity share its output: sweeping ef_search
over three values is one training, one index and three searches. Group names, repeat counts,
checkpoint intervals and file paths are not identity; a changed file content is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from dpr_hpc.inputs.content import ContentHashes, model_identity
from dpr_hpc.grid import CellConfig
from dpr_hpc.grid.config import ALL_STAGES
from dpr_hpc.grid.config import settings_dict

# A plan names each of a cell's stage jobs by a slot: the stage itself, or for a shard stage the
# stage and the shard ("encode-shard#3"), since each shard has its own key.
SLOT_MARK = "#"
KEY_LENGTH = 20  # hex digits: 80 bits, no collision among any number of grids a person runs
# Index settings applied at search time (infer's identity); `keep` (disk use only) is never identity.
NOT_INDEX_BUILD = ("ef_search",)


def key_of(identity: dict[str, Any]) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


def _section(value: Any) -> Any:
    return settings_dict(value) if dataclasses.is_dataclass(value) else value


def encoder_identities(cell: CellConfig, hashes: ContentHashes) -> dict[str, Any]:
    identities = {}
    for role in ("question_encoder", "passage_encoder"):
        name = getattr(cell, role)
        local = cell.local_model(name)
        identities[role] = model_identity(name, str(local) if local is not None else None, hashes)
    return identities


def data_identity(cell: CellConfig, split: str, hashes: ContentHashes) -> str:
    def identity() -> str:
        path = cell.data_path(split)
        return hashes.file(path) if path.is_file() else f"missing:{path}"

    return hashes.once(("data", str(cell.base_dir), getattr(cell.data, split)), identity)


def train_identity(cell: CellConfig, hashes: ContentHashes) -> dict[str, Any]:
    identity = {
        "stage": "train",
        **encoder_identities(cell, hashes),
        "embedding_size": cell.embedding_size,
        "train": _section(cell.train),
        "text": cell.text.identity(),
        "precision": cell.precision.train,
        "train_data": data_identity(cell, "train", hashes),
    }
    if cell.grad_cache.chunk_size:
        identity["grad_cache"] = _section(cell.grad_cache)
    return identity


def index_identity(cell: CellConfig, train_key: str | None, hashes: ContentHashes) -> dict[str, Any]:
    upstream: dict[str, Any] = {"train": train_key} if train_key else {**encoder_identities(cell, hashes), "embedding_size": cell.embedding_size}
    build = {k: v for k, v in cell.index.identity().items() if k not in NOT_INDEX_BUILD}
    identity = {
        "stage": "index",
        **upstream,
        "text": cell.text.identity(),
        "precision": cell.precision.encode,
        "encode_batch_size": cell.encode_batch_size,
        "index": build,
        "dev_data": data_identity(cell, "dev", hashes),
    }
    if cell.timing.pei_includes_tokenization:  # absent at our boundary, so older keys stand
        identity["pei_includes_tokenization"] = True
    return identity


def infer_identity(cell: CellConfig, index_key: str) -> dict[str, Any]:
    identity = {"stage": "infer", "index": index_key, "ef_search": cell.index.ef_search, "top_k": cell.top_k}
    if cell.timing.ita_includes_fetch:
        identity["ita_includes_fetch"] = True
    return identity


def slot(stage: str, shard: int | None = None) -> str:
    return stage if shard is None else f"{stage}{SLOT_MARK}{shard}"


def stage_of(slot_name: str) -> str:
    """'encode-shard#3' -> 'encode-shard'; a plain stage is its own slot."""
    return slot_name.split(SLOT_MARK, 1)[0]


def slot_order(slot_name: str) -> tuple[int, int]:
    """Slots in dependency order (train, index, infer, then the corpus stages), shards in
    shard order: how a plan lists them whatever order a saved plan's JSON holds them in."""
    return ALL_STAGES.index(stage_of(slot_name)), shard_of(slot_name) or 0


def shard_of(slot_name: str) -> int | None:
    """'encode-shard#3' -> 3; None for a plain stage."""
    _, mark, shard = slot_name.partition(SLOT_MARK)
    return int(shard) if mark else None


def corpus_identity(cell: CellConfig, part: str, hashes: ContentHashes) -> str:
    def identity() -> str:
        path = cell.corpus_path(part)
        return hashes.file(path) if path.is_file() else f"missing:{path}"

    return hashes.once(("corpus", str(cell.base_dir), getattr(cell.corpus, part)), identity)


def encode_shard_identity(cell: CellConfig, train_key: str | None, shard: int, hashes: ContentHashes) -> dict[str, Any]:
    corpus = cell.corpus
    upstream: dict[str, Any] = {"train": train_key} if train_key else {**encoder_identities(cell, hashes), "embedding_size": cell.embedding_size}
    return {
        "stage": "encode-shard", **upstream, "text": cell.text.identity(), "precision": cell.precision.encode,
        "encode_batch_size": cell.encode_batch_size, "passages": corpus_identity(cell, "passages", hashes),
        "shards": corpus.shards, "shard": shard, "vectors": corpus.vectors,
    }


def search_shard_identity(cell: CellConfig, train_key: str | None, encode_key: str, hashes: ContentHashes) -> dict[str, Any]:
    corpus = cell.corpus
    identity: dict[str, Any] = {
        "stage": "search-shard", "encode_shard": encode_key, "questions": corpus_identity(cell, "questions", hashes),
        "top_k": corpus.top_k, "index": corpus.index,
    }
    identity.update({"train": train_key} if train_key else {"question_encoder": encoder_identities(cell, hashes)["question_encoder"]})
    if corpus.index == "hnsw":
        identity["hnsw"] = {"m": cell.index.hnsw_m, "ef_construction": cell.index.ef_construction, "ef_search": cell.index.ef_search,
                            "add_batch_size": cell.index.add_batch_size}
    return identity


def corpus_keys(cell: CellConfig, train_key: str | None, hashes: ContentHashes) -> dict[str, str]:
    """The slots and keys of a cell's corpus stages, in dependency order."""
    keys: dict[str, str] = {}
    shards = range(cell.corpus.shards)
    for shard in shards:
        keys[slot("encode-shard", shard)] = key_of(encode_shard_identity(cell, train_key, shard, hashes))
    for shard in shards:
        keys[slot("search-shard", shard)] = key_of(search_shard_identity(cell, train_key, keys[slot("encode-shard", shard)], hashes))
    keys["merge"] = key_of({"stage": "merge", "search_shards": [keys[slot("search-shard", shard)] for shard in shards]})
    return keys


def stage_inputs(cell: CellConfig, stage: str) -> dict[str, tuple[str, Path]]:
    """The files and local folders a stage reads, by role, with their kind: what its record's
    provenance hashes, and what makes the record stale when their content changes."""
    inputs: dict[str, tuple[str, Path]] = {}
    if stage == "train":
        inputs["train_data"] = ("file", cell.data_path("train"))
    elif stage in ("index", "infer"):
        inputs["dev_data"] = ("file", cell.data_path("dev"))
    if stage in ("encode-shard", "merge"):
        inputs["corpus_passages"] = ("file", cell.corpus_path("passages"))
    if stage in ("search-shard", "merge"):
        inputs["corpus_questions"] = ("file", cell.corpus_path("questions"))
    if stage == "train" or cell.evaluate_only:
        for role in ("question_encoder", "passage_encoder"):
            name = getattr(cell, role)
            if cell.local_model(name) is not None:
                inputs[role] = ("folder", cell.local_model(name))
    return inputs


def stage_keys(cell: CellConfig, hashes: ContentHashes) -> dict[str, str]:
    """The key of each of the cell's stage slots, in dependency order."""
    keys: dict[str, str] = {}
    if not cell.evaluate_only:
        keys["train"] = key_of(train_identity(cell, hashes))
    keys["index"] = key_of(index_identity(cell, keys.get("train"), hashes))
    keys["infer"] = key_of(infer_identity(cell, keys["index"]))
    if cell.corpus is not None:
        keys.update(corpus_keys(cell, keys.get("train"), hashes))
    return keys
