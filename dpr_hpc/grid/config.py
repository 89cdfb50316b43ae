"""Typed configuration of one grid cell: what the stages receive instead of raw YAML.

The defaults are the paper's (section 4.5), so a grid file only states what differs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpr_hpc.grid.sources import is_name, local_path
from dpr_hpc.fsutil import resolved

STAGES = ("train", "index", "infer")
# A corpus evaluation's stages (dpr_hpc.stages.corpus): one encode-shard and one search-shard job
# per shard of the corpus, then one merge. A cell has them only when it names a `corpus:`.
CORPUS_STAGES = ("encode-shard", "search-shard", "merge")
SHARD_STAGES = CORPUS_STAGES[:2]
ALL_STAGES = STAGES + CORPUS_STAGES
CORPUS_VECTORS = ("fp32", "fp16")
CORPUS_INDEXES = ("flat", "hnsw")
INDEX_TYPES = ("hnsw_flat", "flat")
INDEX_KEEP = ("first", "all")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # dpr_hpc.modeling.precision; kept here, free of torch
PASSAGE_FORMATS = ("paper", "dpr")  # dpr_hpc.modeling.batching.tokenize_passages
HARD_NEGATIVES = ("first", "shuffle")  # dpr_hpc.stages.train
PADDINGS = ("longest", "max_length")  # TextConfig.pad_to
COMPILE_CHOICES = ("auto", True, False)  # ComputeConfig.compile; dpr_hpc.modeling.compute


def settings_dict(section: Any) -> dict[str, Any]:
    """`dataclasses.asdict` of a settings section, the same dict without asdict's deep copy of
    every scalar: a plan of 2,000 cells takes some 20,000 of them (cell ids and stage keys)."""
    return {name: _plain(getattr(section, name)) for name in _field_names(type(section))}


_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    if type(value) in _SCALARS:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return settings_dict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.lru_cache(maxsize=None)
def _defaults(cls: type) -> Any:
    return cls()


def _without_defaults(section: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """A section's identity: every field, except that `fields` (settings added after cells had
    ids) are left out at their defaults, so the ids and stage keys of existing cells stand."""
    values = settings_dict(section)
    defaults = _defaults(type(section))
    return {k: v for k, v in values.items() if k not in fields or v != getattr(defaults, k)}


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters; the defaults are what the paper's code ran
    (experiments/train_dpr.py in AndrewHarrison/ir2), not DPR's: README, *Fidelity*.

    DPR's NQ recipe differs in learning_rate 2e-5, warmup_steps 1237, weight_decay 0.0,
    max_grad_norm 2.0, lr_floor 0.0, hard_negative "shuffle" and seed 12345."""

    epochs: int = 40
    batch_size: int | str = 16  # or "auto": the largest power of 2 that fits the GPU (issue 6)
    learning_rate: float = 1e-5
    optimizer: str = "adamw"
    scheduler: str = "linear"
    warmup_steps: int = 100
    dropout: float = 0.1
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the paper's code kept
    max_grad_norm: float = 0.0  # 0: no clipping, as the paper's code
    lr_floor: float = 1e-7  # lower bound of the linear decay's LR multiplier (the paper's lr_lambda)
    hard_negative: str = "first"  # or "shuffle": a fresh seeded choice per example every epoch (DPR)
    seed: int = 1234  # the paper's code's default


@dataclass(frozen=True)
class TextConfig:
    """How questions and passages become tokens; shared by training and both encoding stages."""

    max_length: int = 256
    embed_title: bool = True
    # paper: "title text" as one segment (the paper's code); dpr: title [SEP] text with all-zero
    # segment ids (DPR's training, so DPR's released encoders need it).
    passage_format: str = "paper"
    # longest: each batch padded to its longest text (rounded up to 8); max_length: every text
    # padded to max_length, as the paper's code did (its TTT and PEI include that padding).
    padding: str = "longest"

    def identity(self) -> dict[str, Any]:
        return _without_defaults(self, ("padding",))

    def token_settings(self) -> dict[str, Any]:
        """What decides the tokens themselves (the token cache's key): padding is applied per
        batch, after the cache, so both paddings share one entry."""
        return {k: v for k, v in settings_dict(self).items() if k != "padding"}

    @property
    def pad_to(self) -> int | None:
        """`pad_batch`'s fixed width: max_length under the paper's padding, else None."""
        return self.max_length if self.padding == "max_length" else None


@dataclass(frozen=True)
class IndexConfig:
    """FAISS index: HNSW-Flat over inner product as in DPR, or exact IndexFlatIP."""

    type: str = "hnsw_flat"
    hnsw_m: int = 512
    ef_construction: int = 200
    ef_search: int = 128
    # Which index repeats keep their index file: infer searches repeat 0's only, so by default
    # the others record their timings and delete theirs (6-10 GB each at 935k passages).
    # Changes no result, so it is not part of the cell id.
    keep: str = field(default="first", compare=False)
    # false: every pool entry is its own row, duplicates included, and rankings are read row by
    # row, as the paper's code indexed and scored them (its drop_duplicates result was discarded).
    deduplicate: bool = True
    # Rows per FAISS add call (dpr_hpc.modeling.searcher): the paper's datasets.add_faiss_index
    # added 1,000 a call; HNSW's graph depends on the batches, so it is part of the build.
    add_batch_size: int = 8192

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in _without_defaults(self, ("deduplicate", "add_batch_size")).items() if k != "keep"}


@dataclass(frozen=True)
class TimingConfig:
    """Where the PEI and ITA timers start and stop (README, *Fidelity*). Ours time the work each
    stage names; the paper's code's timers also held the tokenization of the pool (PEI) and the
    reading of each query's result rows (ITA), which these settings put back."""

    # true: PEI runs from tokenizing the pool, fresh (no token cache inside the timer), to the
    # last FAISS add; false: encoding and index build, tokenization recorded apart.
    pei_includes_tokenization: bool = False
    # true: each query's time includes reading its top-k passages (id, title, text) and their
    # vectors, as the paper's get_nearest_examples fetched its result rows; false: the search only.
    ita_includes_fetch: bool = False


@dataclass(frozen=True)
class GradCacheConfig:
    """Gradient caching: the contrastive batch is encoded `chunk_size` texts at a time, so a
    batch of 128 trains in the memory of a chunk (dpr_hpc.modeling.grad_cache). 0: off."""

    chunk_size: int = 0


@dataclass(frozen=True)
class CheckpointConfig:
    """How often a training saves its full state for resuming; never changes a result, so it is
    not part of the cell id. `every_steps: 0` means by time only. A stop signal (the time
    limit's warning, preemption) always writes one as well."""

    every_minutes: float = 30.0
    every_steps: int = 0


@dataclass(frozen=True)
class PrecisionConfig:
    """Number format per stage (dpr_hpc.modeling.precision): the paper trained under fp16
    autocast with a gradient scaler and encoded in fp32, which one knob cannot say.
    Each of auto, fp32, bf16, fp16; `precision: X` in a grid sets both."""

    train: str = "auto"
    encode: str = "auto"  # the index and infer stages

    @classmethod
    def from_json(cls, value: "dict[str, str] | str") -> "PrecisionConfig":
        """A record's precision: a mapping, or one string for both (records before issue 12)."""
        return cls(value, value) if isinstance(value, str) else cls(**value)


@dataclass(frozen=True)
class ComputeConfig:
    """How the stages compute, not what: changes no result beyond float rounding (pinned by
    tests/test_compile.py), so it is not part of the cell id or any stage key, but every
    record says what ran (dpr_hpc.modeling.compute).

    compile: true compiles the encoders with torch.compile (inductor) and fails the stage if
    that fails; false never compiles; auto compiles where the stage's expected work repays the
    compile time, and a failed compile then runs eager and says why in the record."""

    compile: bool | str = "auto"


@dataclass(frozen=True)
class Repeats:
    """How many times each timing stage runs; training runs once because its checkpoint feeds the rest."""

    index: int = 1
    infer: int = 1

    def of(self, stage: str) -> int:
        """Only the timing stages repeat: training and the corpus stages run once (a corpus
        shard's job is one per shard, not per repeat)."""
        return getattr(self, stage) if stage in ("index", "infer") else 1


@dataclass(frozen=True)
class DataConfig:
    """Files in DPR's biencoder JSON format, as written in the grid (so they enter the cell id
    the same way on every machine): paths, or source names such as 'dpr:nq-train';
    `CellConfig.data_path` resolves them."""

    train: str | None
    dev: str


@dataclass(frozen=True)
class CorpusConfig:
    """A corpus to evaluate a cell's trained towers on, beside the dev pool: DPR's Wikipedia
    passages (psgs_w100.tsv: id, text, title, with a header line) and test questions
    (nq-test.qa.csv: question TAB a Python list of answers; an optional third column of gold
    passage ids, ours, gives MRR). The passages are cut into `shards` byte ranges, each encoded and
    searched by its own stage job; `parallel` of them run at once (0: all), as SLURM's `%K`.

    Paths are as written in the grid, as `DataConfig`'s are; `CellConfig.corpus_path` resolves them."""

    passages: str
    questions: str
    shards: int = 1
    parallel: int = field(default=0, compare=False)  # scheduling only, never identity
    top_k: int = 100
    vectors: str = "fp32"  # the shard's vectors on disk: fp16 halves the 64.5 GB of psgs_w100 at 768-d
    index: str = "flat"  # exact IndexFlatIP per shard, or HNSW (the cell's index.hnsw_m, ef_construction, ef_search)
    name: str = ""  # how tables name the corpus; default: the passages file's name without its suffixes

    @property
    def label(self) -> str:
        return self.name or Path(self.passages).name.split(".")[0]

    @property
    def array_parallel(self) -> int:
        """How many of one stage's shard jobs may run at once."""
        return min(self.parallel, self.shards) if self.parallel else self.shards

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "parallel"}


@dataclass(frozen=True)
class CellConfig:
    """One row of the paper's tables: an encoder pair at one embedding size with its settings.

    `train is None` marks an evaluation-only cell (pre-trained encoders, no train stage).
    """

    group: str
    question_encoder: str
    passage_encoder: str
    embedding_size: int
    train: TrainConfig | None
    text: TextConfig
    index: IndexConfig
    encode_batch_size: int
    top_k: int
    data: DataConfig
    repeats: Repeats
    grad_cache: GradCacheConfig = GradCacheConfig()
    precision: PrecisionConfig = PrecisionConfig()
    timing: TimingConfig = TimingConfig()
    corpus: CorpusConfig | None = None
    base_dir: Path = field(default=Path("."), compare=False)
    checkpoint: CheckpointConfig = field(default=CheckpointConfig(), compare=False)
    compute: ComputeConfig = field(default=ComputeConfig(), compare=False)

    def data_path(self, split: str) -> Path:
        """The train or dev file on this machine: a named source's file in the data folder
        (dpr_hpc.grid.sources), or a path, relative ones taken from the grid's folder."""
        written = getattr(self.data, split)
        if written is None:
            raise ValueError(f"cell {self.cell_id} has no {split} data")
        return self._local_file(written)

    def corpus_path(self, part: str) -> Path:
        """The corpus's passages or questions file on this machine, as `data_path` resolves."""
        if self.corpus is None:
            raise ValueError(f"cell {self.cell_id} has no corpus")
        return self._local_file(getattr(self.corpus, part))

    def _local_file(self, written: str) -> Path:
        if is_name(written):
            return local_path(written)
        return resolved(self.base_dir / Path(written).expanduser())

    def model_path(self, name: str) -> str:
        """A local folder's resolved path, or a hub name as it is."""
        local = self.local_model(name)
        return str(local) if local is not None else name

    def local_model(self, name: str) -> Path | None:
        """'./x', '../x', '/x' and '~/x' are local folders; so is 'org/x' when the grid's folder
        holds one by that name (a job's working directory is not the grid's); None for a hub
        name. (Compare with None, not the name: an absolute path resolves to itself.)"""
        if name.startswith("~"):
            return resolved(self.base_dir / Path(name).expanduser())
        if name.startswith(("./", "../", "/")) or (self.base_dir / name).is_dir():
            return _local_folder(self.base_dir, name) if self.base_dir.is_absolute() else resolved(self.base_dir / name)
        return None

    @property
    def hub_models(self) -> tuple[str, ...]:
        """The encoders that are hub names, not local folders."""
        return tuple(dict.fromkeys(n for n in (self.question_encoder, self.passage_encoder) if self.local_model(n) is None))

    @property
    def evaluate_only(self) -> bool:
        return self.train is None

    @property
    def stages(self) -> tuple[str, ...]:
        own = STAGES[1:] if self.evaluate_only else STAGES
        return own + CORPUS_STAGES if self.corpus is not None else own

    @property
    def batch_size(self) -> int | None:
        return None if self.train is None else self.train.batch_size

    @property
    def encoder_label(self) -> str:
        """The encoder as a table shows it: one name, or 'question | passage' for a pair."""
        if self.question_encoder == self.passage_encoder:
            return self.question_encoder
        return f"{self.question_encoder} | {self.passage_encoder}"

    def identity(self) -> dict[str, Any]:
        """Everything that changes a result; group, repeats, checkpoint intervals and how the
        stages compute (compute.compile) do not, so they are left out."""
        identity = {
            "question_encoder": self.question_encoder,
            "passage_encoder": self.passage_encoder,
            "embedding_size": self.embedding_size,
            "train": None if self.train is None else settings_dict(self.train),
            "text": self.text.identity(),
            "index": self.index.identity(),
            "encode_batch_size": self.encode_batch_size,
            "top_k": self.top_k,
            "precision": settings_dict(self.precision),
            "data": settings_dict(self.data),
        }
        if self.train is not None and self.grad_cache.chunk_size:  # absent when off, so older ids stand
            identity["grad_cache"] = settings_dict(self.grad_cache)
        if self.timing != TimingConfig():  # absent at our timers, so older ids stand
            identity["timing"] = settings_dict(self.timing)
        if self.corpus is not None:  # absent without one, so older ids stand
            identity["corpus"] = self.corpus.identity()
        return identity

    @functools.cached_property
    def config_hash(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @functools.cached_property
    def cell_id(self) -> str:
        """Readable and stable: the same config gives the same id on any machine, any day."""
        slug = _slug(self.question_encoder)
        size = f"es{self.embedding_size}"
        batch = "eval" if self.train is None else f"bs{self.train.batch_size}"
        return f"{slug}-{size}-{batch}-{self.config_hash[:8]}"

    def to_json(self) -> dict[str, Any]:
        record = self.identity()
        record["group"] = self.group
        record["repeats"] = settings_dict(self.repeats)
        record["checkpoint"] = settings_dict(self.checkpoint)
        record["compute"] = settings_dict(self.compute)
        record["index"] = settings_dict(self.index)
        record["text"] = settings_dict(self.text)
        record["timing"] = settings_dict(self.timing)
        if self.corpus is not None:
            record["corpus"] = settings_dict(self.corpus)
        record["cell_id"] = self.cell_id
        record["base_dir"] = str(self.base_dir)
        return record


def _slug(model_name: str) -> str:
    """'huawei-noah/TinyBERT_General_4L_312D' -> 'tinybert_general_4l_312d'."""
    last = model_name.rstrip("/").split("/")[-1].lower()
    return re.sub(r"[^a-z0-9_.]+", "-", last).strip("-.") or "model"


def cell_from_json(record: dict[str, Any]) -> CellConfig:
    """Rebuild a cell from `to_json` output: how a stage job reads its config from the run folder."""
    return CellConfig(
        group=record["group"],
        question_encoder=record["question_encoder"],
        passage_encoder=record["passage_encoder"],
        embedding_size=record["embedding_size"],
        train=None if record["train"] is None else TrainConfig(**record["train"]),
        text=TextConfig(**record["text"]),
        index=IndexConfig(**record["index"]),
        encode_batch_size=record["encode_batch_size"],
        top_k=record["top_k"],
        data=DataConfig(**record["data"]),
        repeats=Repeats(**record["repeats"]),
        grad_cache=GradCacheConfig(**(record.get("grad_cache") or {})),
        precision=PrecisionConfig.from_json(record.get("precision", "auto")),
        timing=TimingConfig(**(record.get("timing") or {})),
        corpus=CorpusConfig(**record["corpus"]) if record.get("corpus") else None,
        base_dir=Path(record["base_dir"]),
        checkpoint=CheckpointConfig(**record.get("checkpoint", {})),
        compute=ComputeConfig(**record.get("compute", {})),
    )


@functools.lru_cache(maxsize=1 << 12)
def _local_folder(base_dir: Path, name: str) -> Path:
    """A local model folder named in a grid, resolved once per process however many cells name it."""
    return resolved(base_dir / name)
