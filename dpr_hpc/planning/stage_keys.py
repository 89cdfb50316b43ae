"""Stage identity: a key per stage from what determines its output, and only that.

    train  encoders (local folder content, or hub name and cached revision), embedding size,
           training hyper-parameters, text settings (padding too), training precision, gradient
           cache, train file content
    index  the train key (or, for an evaluation-only cell, the encoders and embedding size),
           text settings, encoding precision and batch size, the index's build settings
           (de-duplication and add batch size too), the PEI timer's boundary, dev file content
    infer  the index key, the search settings (ef_search, top_k) and the ITA timer's boundary

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
from dpr_hpc.grid.config import settings_dict

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


def stage_inputs(cell: CellConfig, stage: str) -> dict[str, tuple[str, Path]]:
    """The files and local folders a stage reads, by role, with their kind: what its record's
    provenance hashes, and what makes the record stale when their content changes."""
    inputs: dict[str, tuple[str, Path]] = {}
    if stage == "train":
        inputs["train_data"] = ("file", cell.data_path("train"))
    else:
        inputs["dev_data"] = ("file", cell.data_path("dev"))
    if stage == "train" or cell.evaluate_only:
        for role in ("question_encoder", "passage_encoder"):
            name = getattr(cell, role)
            if cell.local_model(name) is not None:
                inputs[role] = ("folder", cell.local_model(name))
    return inputs


def stage_keys(cell: CellConfig, hashes: ContentHashes) -> dict[str, str]:
    """The key of each of the cell's stages."""
    keys: dict[str, str] = {}
    if not cell.evaluate_only:
        keys["train"] = key_of(train_identity(cell, hashes))
    keys["index"] = key_of(index_identity(cell, keys.get("train"), hashes))
    keys["infer"] = key_of(infer_identity(cell, keys["index"]))
    return keys
