"""What every stage shares: its output type, its inputs, seeding and the tokenized data
(the device and its memory are dpr_hpc.modeling.device's)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from dpr_hpc.grid import CellConfig
from dpr_hpc.planning.plan import StageJob
from dpr_hpc.store.paths import AttemptPaths


@dataclass
class StageOutput:
    metrics: dict[str, Any]
    timings: dict[str, float]
    artifacts: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # Folders only needed to resume (training checkpoints, embedding shards): the runner deletes
    # them once the result record is safely written, not before.
    discard: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class StageIO:
    """Where a stage job writes and what it reads, handed over by the runner: the job's own
    working attempt, the complete outputs of the upstream stages, the shared caches."""

    job: StageJob
    out: AttemptPaths
    prepared_cache: Path  # the data files' prepared forms (dpr_hpc.inputs.prepared)
    trained: AttemptPaths | None = None  # the train output (index and infer of a trained cell)
    index: AttemptPaths | None = None  # index repeat 0's output (infer)
    token_cache: Path | None = None
    hub_revisions: dict[str, str] = field(default_factory=dict)  # hub model -> the commit to load
    # The digest of each upstream record read (job id -> SHA-256 of its result.json): what a
    # resumed job's partial outputs must have been made from to be kept.
    upstream_digests: dict[str, str] = field(default_factory=dict)
    # Raises once another copy took this job's claim: called before every checkpoint, shard and
    # output the stage writes (dpr_hpc.store.claims). In-process calls hold no claim.
    check_claim: Callable[[], None] = lambda: None
    # Every upstream output by slot (planning.stage_keys.slot): how a search shard finds its
    # encoded shard ("encode-shard#3") and the merge every search shard.
    upstream: dict[str, AttemptPaths] = field(default_factory=dict)
    shard: int | None = None  # which shard of the corpus a shard stage's job is

    def revision(self, name_or_path: str) -> str | None:
        """The commit to load a hub model at (None for a local folder)."""
        return self.hub_revisions.get(name_or_path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encoder_source(cell: CellConfig, io: StageIO, tower: str) -> str:
    """Where a tower's weights come from: the trained checkpoint the job reads, or the named
    model for an evaluation-only cell."""
    if cell.evaluate_only:
        name = cell.question_encoder if tower == "question" else cell.passage_encoder
        return cell.model_path(name)
    if io.trained is None:
        raise ValueError(f"{io.job.id}: no trained model handed to this job")
    return str(io.trained.encoder(tower))


def load_trained_tower(cell: CellConfig, io: StageIO, tower: str, device: torch.device):
    """The encoder and tokenizer that the index (passage) or infer (question) stage encodes with."""
    from dpr_hpc.modeling.encoder import DprEncoder, load_tokenizer

    source = encoder_source(cell, io, tower)
    revision = io.revision(source)
    return DprEncoder.from_pretrained(source, cell.embedding_size, revision=revision).to(device), load_tokenizer(source, revision)


def compile_for_encoding(cell: CellConfig, encoder, texts, pad_id: int, device: torch.device, precision: str):
    """Compile the encoder where `compute.compile` says so, before the timed encoding of
    `texts` (PEI and the question encoding time leave the compile out; the record has it)."""
    from dpr_hpc.modeling.compute import compile_encoders, encoder_flops_per_token, expected_eager_s
    from dpr_hpc.modeling.encoding import warm_up

    eager_s = expected_eager_s(float(texts.lengths.sum()) * encoder_flops_per_token(encoder), device)
    return compile_encoders([encoder], cell.compute.compile, eager_s, 1,
                            lambda: warm_up(encoder, texts, pad_id, device, precision, cell.text.pad_to), progress)


def encoding_compute(encoder, compiled) -> dict[str, Any]:
    """The record's `compute` entry of an encoding stage."""
    from dpr_hpc.modeling.compute import attention_implementation

    return {"compile": compiled.to_json(), "attention": attention_implementation(encoder)}


def tokenized(io: StageIO, cell: CellConfig, what: str, data, tokenizer, build):
    """`build()`'s tokens of the prepared `data` (a PreparedTrain or PreparedDev) through the
    runs root's token cache: tokenized once per tokenizer, data content and settings, whichever
    grid, cell or stage asks first. Keyed by the content the prepared data was parsed from,
    not by hashing its file again, which may hold other bytes by now."""
    from dpr_hpc.modeling.token_cache import TokenCache

    return TokenCache(io.token_cache).get(what, data.manifest["sha256"], tokenizer, cell.text.token_settings(), build)


def tokenized_fresh(io: StageIO, cell: CellConfig, what: str, data, tokenizer, build):
    """`build()`'s tokens made now, whatever the cache holds, and the seconds that took (for a
    timer that must include the tokenization, the paper's PEI); they are then kept in the cache
    as `tokenized` would have, outside those seconds."""
    from dpr_hpc.modeling.token_cache import Lookup, TokenCache

    started = time.perf_counter()
    texts = build()
    seconds = time.perf_counter() - started
    key = TokenCache(io.token_cache).put(what, data.manifest["sha256"], tokenizer, cell.text.token_settings(), texts)
    return Lookup(texts, False, key), seconds


def prepared_details(data) -> dict[str, Any]:
    """What the record says of the data it read (a PreparedTrain or PreparedDev): whether the
    prepared form was mapped or built by this job, how long that took, and which entry."""
    return {"hit": data.hit, "load_s": round(data.load_s, 3), "entry": data.folder.name, "parser": data.manifest["parser"]}


def progress(message: str) -> None:
    """A line for the job's log (the local backend's and SLURM's stdout file)."""
    print(message, flush=True)
