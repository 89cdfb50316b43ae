"""YAML grid file -> validated `Grid`: the only place that reads raw YAML.

Every error names the file, the key path and what was expected, and is raised before anything
runs. Settings merge in three levels: `defaults` <- block <- cell.

    name: paper
    data: {train: nq-train.json, dev: nq-dev.json}
    defaults: {train: {...}, text: {...}, index: {...}, encode_batch_size: 512, top_k: 100,
               precision: {train: auto, encode: auto},   # or one string for both
               checkpoint: {every_minutes: 30, every_steps: 0},
               timing: {pei_includes_tokenization: false, ita_includes_fetch: false},
               corpus: {passages: psgs_w100.tsv, questions: nq-test.qa.csv, shards: 50, parallel: 8,
                        top_k: 100, vectors: fp32, index: flat},   # optional; null turns it off
               compute: {compile: auto}}                # or true / false
    blocks:
      - name: table1-bert
        encoder: bert-base-uncased
        embedding_sizes: [1536, 768]
        train: {batch_size: 16}
        cells:                       # cells with their own overrides
          - {embedding_size: 384, repeats: {index: 5, infer: 5}}
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from dpr_hpc.errors import GridError
from dpr_hpc.grid.config import (
    CORPUS_INDEXES,
    CORPUS_VECTORS,
    HARD_NEGATIVES,
    INDEX_KEEP,
    INDEX_TYPES,
    PADDINGS,
    PASSAGE_FORMATS,
    PRECISIONS,
    CellConfig,
    COMPILE_CHOICES,
    CheckpointConfig,
    ComputeConfig,
    CorpusConfig,
    GradCacheConfig,
    DataConfig,
    IndexConfig,
    PrecisionConfig,
    Repeats,
    TextConfig,
    TimingConfig,
    TrainConfig,
)
from dpr_hpc.grid.resources import load_yaml, resolve
from dpr_hpc.grid.sources import SourceError, is_name, source

SECTIONS: dict[str, type] = {
    "train": TrainConfig,
    "text": TextConfig,
    "index": IndexConfig,
    "repeats": Repeats,
    "checkpoint": CheckpointConfig,
    "grad_cache": GradCacheConfig,
    "precision": PrecisionConfig,
    "timing": TimingConfig,
    "compute": ComputeConfig,
}
SCALARS = ("encode_batch_size", "top_k")
SCALAR_TYPES: dict[str, type] = {"encode_batch_size": int, "top_k": int}
TOP_LEVEL_KEYS = ("name", "description", "data", "defaults", "blocks", "slurm")
DEFAULTS_KEYS = tuple(SECTIONS) + SCALARS + ("corpus",)
CELL_KEYS = (
    ("encoder", "question_encoder", "passage_encoder", "evaluate_only", "data", "embedding_size")
    + DEFAULTS_KEYS
)
BLOCK_KEYS = tuple(k for k in CELL_KEYS if k != "embedding_size") + ("name", "embedding_sizes", "cells")

# Per-field constraints beyond the type; a field absent here accepts any value of its type.
_Check = tuple[Callable[[Any], bool], str]
_POSITIVE: _Check = (lambda v: v > 0, "a positive number")
_NON_NEGATIVE: _Check = (lambda v: v >= 0, "a number >= 0")
_PRECISION: _Check = (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)} (auto: bf16 on GPUs of compute capability >= 8.0 "
                      "and CPUs with native bf16, fp16 on older GPUs, else fp32)")
FIELD_CHECKS: dict[str, _Check] = {
    "train.epochs": _POSITIVE,
    "train.batch_size": _POSITIVE,  # or the string "auto", accepted before this check
    "train.learning_rate": _POSITIVE,
    "train.optimizer": (lambda v: v == "adamw", "'adamw' (the paper's optimizer)"),
    "train.scheduler": (lambda v: v == "linear", "'linear' (linear decay after warm-up)"),
    "train.warmup_steps": _NON_NEGATIVE,
    "train.dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "train.weight_decay": _NON_NEGATIVE,
    "train.max_grad_norm": (lambda v: v >= 0, "a number >= 0 (0: no clipping, the paper's)"),
    "train.lr_floor": (lambda v: 0 <= v < 1, "a multiplier in [0, 1) (the paper's 1e-7; DPR's 0)"),
    "train.hard_negative": (lambda v: v in HARD_NEGATIVES, f"one of {', '.join(HARD_NEGATIVES)} (first: the paper's; shuffle: DPR's)"),
    "text.max_length": (lambda v: 8 <= v <= 8192, "a token count between 8 and 8192"),
    "text.passage_format": (lambda v: v in PASSAGE_FORMATS, f"one of {', '.join(PASSAGE_FORMATS)} "
                            "(paper: 'title text' as one segment; dpr: title [SEP] text, all-zero segment ids)"),
    "text.padding": (lambda v: v in PADDINGS, f"one of {', '.join(PADDINGS)} "
                     "(longest: each batch to its longest text; max_length: every text to text.max_length, the paper's)"),
    "index.type": (lambda v: v in INDEX_TYPES, f"one of {', '.join(INDEX_TYPES)}"),
    "index.hnsw_m": _POSITIVE,
    "index.ef_construction": _POSITIVE,
    "index.ef_search": _POSITIVE,
    "index.add_batch_size": (lambda v: v > 0, "a positive number of rows per FAISS add call (the paper's datasets added 1000)"),
    "index.keep": (lambda v: v in INDEX_KEEP, f"one of {', '.join(INDEX_KEEP)} (which index repeats keep their index file)"),
    "repeats.index": _POSITIVE,
    "repeats.infer": _POSITIVE,
    "checkpoint.every_minutes": _POSITIVE,
    "checkpoint.every_steps": _NON_NEGATIVE,
    "grad_cache.chunk_size": _NON_NEGATIVE,
    "encode_batch_size": _POSITIVE,
    "precision": _PRECISION,  # the one-string form, for both stages
    "precision.train": _PRECISION,
    "precision.encode": _PRECISION,
    "top_k": (lambda v: 1 <= v <= 2048, "an integer between 1 and 2048 (FAISS's HNSW limit)"),
    "corpus.shards": (lambda v: v > 0, "a positive number of shards (DPR cut psgs_w100 into 50)"),
    "corpus.parallel": (lambda v: v >= 0, "a number of shard jobs at once, >= 0 (0: every shard at once)"),
    "corpus.top_k": (lambda v: 1 <= v <= 2048, "an integer between 1 and 2048 (FAISS's limit on k)"),
    "corpus.vectors": (lambda v: v in CORPUS_VECTORS, f"one of {', '.join(CORPUS_VECTORS)} (how a shard's vectors are stored on disk)"),
    "corpus.index": (lambda v: v in CORPUS_INDEXES, f"one of {', '.join(CORPUS_INDEXES)} (flat: exact IndexFlatIP per shard; "
                     "hnsw: HNSW-Flat per shard with the cell's index.hnsw_m, ef_construction and ef_search)"),
}
CORPUS_FIELDS = {f.name: f for f in dataclasses.fields(CorpusConfig)}
CORPUS_FILES = ("passages", "questions")


@dataclass(frozen=True)
class Grid:
    """A loaded grid: its cells in file order, the data files it names that are absent here,
    and its SLURM resources (a profile file and per-stage overrides; never part of a cell id)."""

    name: str
    path: Path
    cells: tuple[CellConfig, ...]
    missing_data: tuple[str, ...]
    slurm_profile: Path | None = None
    slurm_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)



def load_grid(path: str | Path, require_data: bool = True) -> Grid:
    """Read and validate a grid file; `require_data=False` lets `plan` run where the data files
    and local model folders it names are absent (it lists them in `missing_data`)."""
    path = Path(path)
    where = str(path)
    raw = _read_yaml(path)
    _check_mapping(raw, where, "", TOP_LEVEL_KEYS)
    name = _name(raw.get("name"), where, "name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise GridError(where, "name", f"expected a folder name (letters, digits, '_', '.', '-'): it names the run folder; got {name!r}")

    defaults = raw.get("defaults", {})
    _check_mapping(defaults, where, "defaults", DEFAULTS_KEYS)
    base = _parse_settings(defaults, where, "defaults")
    if "data" in raw:
        base["data"] = _parse_data(raw["data"], where, "data")

    blocks = raw.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise GridError(where, "blocks", "expected a non-empty list of blocks (encoders with their sizes)")
    cells: list[tuple[str, CellConfig]] = []
    for i, block in enumerate(blocks):
        cells.extend(_expand_block(block, base, where, f"blocks[{i}]", path.parent.resolve()))

    _reject_duplicates(cells, where)
    missing = _missing_files([c for _, c in cells])
    if require_data and missing:
        key, file = missing[0]
        raise GridError(where, key, f"not found: {file}")
    profile, overrides = _parse_slurm(raw.get("slurm", {}), where, path.parent.resolve())
    grid = Grid(name, path, tuple(c for _, c in cells), tuple(sorted({f for _, f in missing})), profile, overrides)
    resolve(profile, overrides, where)  # validates the profile and the overrides now, before anything starts
    return grid


def _parse_slurm(raw: Any, where: str, base_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """The grid's `slurm:` section: an optional profile path (from the grid's folder) and overrides."""
    _check_mapping(raw, where, "slurm", ("profile", "defaults", "stages"))
    profile = raw.get("profile")
    if profile is not None and not (isinstance(profile, str) and profile):
        raise GridError(where, "slurm.profile", f"expected a profile file path, got {_type_name(profile)}")
    return (base_dir / profile if profile else None), {k: v for k, v in raw.items() if k != "profile"}


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GridError(str(path), "", "grid file not found") from None
    except OSError as exc:
        raise GridError(str(path), "", f"cannot read the grid file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise GridError(str(path), f"byte {exc.start}", "not valid UTF-8") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise GridError(str(path), at, f"YAML syntax error: {problem}") from None


def _check_mapping(value: Any, where: str, key_path: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, dict):
        raise GridError(where, key_path or "(top level)", f"expected a mapping, got {_type_name(value)}")
    for key in value:
        if key not in allowed:
            raise GridError(where, _join(key_path, str(key)), f"unknown key{_suggest(str(key), allowed)}")


def _suggest(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; expected one of {', '.join(allowed)}"


def _parse_settings(raw: dict, where: str, key_path: str) -> dict[str, Any]:
    """Validate the overridable settings of one level into {section: {field: value}, scalar: value}."""
    parsed: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        if section in raw:
            value = raw[section]
            if section == "precision" and isinstance(value, str):
                precision = _typed(value, str, "precision", where, _join(key_path, section))
                value = {"train": precision, "encode": precision}
            parsed[section] = _parse_section(value, cls, section, where, _join(key_path, section))
    for scalar in SCALARS:
        if scalar in raw:
            parsed[scalar] = _typed(raw[scalar], SCALAR_TYPES[scalar], scalar, where, _join(key_path, scalar))
    if "corpus" in raw:
        parsed["corpus"] = _parse_corpus(raw["corpus"], where, _join(key_path, "corpus"))
    return parsed


def _parse_corpus(raw: Any, where: str, key_path: str) -> dict[str, Any] | None:
    """One level's `corpus:` settings (null: no corpus here, whatever a lower level named);
    that the files are named is checked once the levels are merged (`_corpus`)."""
    if raw is None:
        return None
    _check_mapping(raw, where, key_path, tuple(CORPUS_FIELDS))
    parsed = {}
    for key, value in raw.items():
        if key in CORPUS_FILES:
            if not (isinstance(value, str) and value):
                raise GridError(where, _join(key_path, key), f"expected a file path or a source name (e.g. dpr:psgs_w100), got {_type_name(value)}")
            _check_source_name(value, where, _join(key_path, key))
            parsed[key] = value
        else:
            parsed[key] = _typed(value, type(CORPUS_FIELDS[key].default), f"corpus.{key}", where, _join(key_path, key))
    return parsed


def _parse_section(raw: Any, cls: type, section: str, where: str, key_path: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_mapping(raw, where, key_path, tuple(fields))
    return {
        key: value if (section, key, value) == ("train", "batch_size", "auto")
        else _compile_choice(value, where, _join(key_path, key)) if (section, key) == ("compute", "compile")
        else _typed(value, type(fields[key].default), f"{section}.{key}", where, _join(key_path, key))
        for key, value in raw.items()
    }


def _compile_choice(value: Any, where: str, key_path: str) -> bool | str:
    """compute.compile: YAML's true/false, or the string auto."""
    if any(value is choice or (isinstance(value, str) and value == choice) for choice in COMPILE_CHOICES):
        return value
    raise GridError(where, key_path, f"expected auto, true or false (auto: compile where the stage's work repays the compile time), got {value!r}")


def _typed(value: Any, kind: type, field_key: str, where: str, key_path: str) -> Any:
    """Check one scalar's type (YAML's '1e-5' string is accepted as a float) and its constraint."""
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise GridError(where, key_path, f"expected {_kind_name(kind)}, got {_type_name(value)} {value!r}")
    check = FIELD_CHECKS.get(field_key)
    if check and not check[0](value):
        raise GridError(where, key_path, f"expected {check[1]}, got {value!r}")
    return value


def _parse_data(raw: Any, where: str, key_path: str) -> dict[str, str | None]:
    _check_mapping(raw, where, key_path, ("train", "dev"))
    parsed: dict[str, str | None] = {}
    for key, value in raw.items():
        if value is not None and not (isinstance(value, str) and value):
            raise GridError(where, _join(key_path, key), f"expected a file path or a source name (e.g. dpr:nq-{key}), got {_type_name(value)}")
        if value is not None:
            _check_source_name(value, where, _join(key_path, key))
        parsed[key] = value
    return parsed


def _check_source_name(value: str, where: str, key_path: str) -> None:
    """A value written as a source name (dpr:...) must name a source the catalog knows."""
    if is_name(value):
        try:
            source(value)
        except SourceError as error:
            raise GridError(where, key_path, str(error)) from None


def _expand_block(
    block: Any, base: dict[str, Any], where: str, key_path: str, base_dir: Path
) -> list[tuple[str, CellConfig]]:
    _check_mapping(block, where, key_path, BLOCK_KEYS)
    group = _name(block.get("name"), where, _join(key_path, "name"))
    block_settings = _merge(base, _parse_level(block, where, key_path))
    sizes = block.get("embedding_sizes", [])
    listed = block.get("cells", [])
    if not isinstance(sizes, list):
        raise GridError(where, _join(key_path, "embedding_sizes"), f"expected a list of integers, got {_type_name(sizes)}")
    if not isinstance(listed, list):
        raise GridError(where, _join(key_path, "cells"), f"expected a list of cells, got {_type_name(listed)}")
    if not sizes and not listed:
        raise GridError(where, _join(key_path, "embedding_sizes"), "expected a non-empty list of embedding sizes (or a 'cells' list)")

    cells = []
    for j, size in enumerate(sizes):
        size_path = f"{key_path}.embedding_sizes[{j}]"
        cells.append((size_path, _build_cell(group, block_settings, size, where, size_path, base_dir)))
    for j, raw_cell in enumerate(listed):
        cell_path = f"{key_path}.cells[{j}]"
        _check_mapping(raw_cell, where, cell_path, CELL_KEYS)
        if "embedding_size" not in raw_cell:
            raise GridError(where, _join(cell_path, "embedding_size"), "missing; expected a positive integer")
        settings = _merge(block_settings, _parse_level(raw_cell, where, cell_path))
        size = raw_cell["embedding_size"]
        cells.append((cell_path, _build_cell(group, settings, size, where, _join(cell_path, "embedding_size"), base_dir)))
    return cells


def _parse_level(raw: dict, where: str, key_path: str) -> dict[str, Any]:
    """The settings a block or a cell may set: the defaults' sections plus encoders and data."""
    parsed = _parse_settings(raw, where, key_path)
    for key in ("encoder", "question_encoder", "passage_encoder"):
        if key in raw:
            parsed[key] = _name(raw[key], where, _join(key_path, key))
    if "evaluate_only" in raw:
        parsed["evaluate_only"] = _typed(raw["evaluate_only"], bool, "evaluate_only", where, _join(key_path, "evaluate_only"))
    if "data" in raw:
        parsed["data"] = _parse_data(raw["data"], where, _join(key_path, "data"))
    # The model keys say where they came from, so a conflict can be reported at the right level.
    parsed["_at"] = key_path
    return parsed


def _merge(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    merged = dict(lower)
    for key, value in upper.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif key in ("encoder", "question_encoder", "passage_encoder"):
            # A more specific level naming a model replaces the whole encoder choice.
            for model_key in ("encoder", "question_encoder", "passage_encoder"):
                if model_key not in upper:
                    merged.pop(model_key, None)
            merged[key] = value
        else:
            merged[key] = value
    return merged


def _build_cell(
    group: str, settings: dict[str, Any], size: Any, where: str, size_path: str, base_dir: Path
) -> CellConfig:
    at = settings.get("_at", size_path)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise GridError(where, size_path, f"expected a positive integer embedding size, got {size!r}")
    question, passage = _encoders(settings, where, at)
    evaluate_only = settings.get("evaluate_only", False)
    data = {"train": None, "dev": None, **settings.get("data", {})}
    if not data["dev"]:
        raise GridError(where, "data.dev", "missing; expected the dev file in DPR's biencoder JSON format")
    if not evaluate_only and not data["train"]:
        raise GridError(where, "data.train", "missing; expected the training file (or 'evaluate_only: true')")
    return CellConfig(
        group=group,
        question_encoder=question,
        passage_encoder=passage,
        embedding_size=size,
        train=None if evaluate_only else TrainConfig(**settings.get("train", {})),
        text=TextConfig(**settings.get("text", {})),
        index=IndexConfig(**settings.get("index", {})),
        encode_batch_size=settings.get("encode_batch_size", 512),
        top_k=settings.get("top_k", 100),
        precision=PrecisionConfig(**settings.get("precision", {})),
        data=DataConfig(train=None if evaluate_only else data["train"], dev=data["dev"]),
        repeats=Repeats(**settings.get("repeats", {})),
        grad_cache=_grad_cache(settings, where, at),
        timing=TimingConfig(**settings.get("timing", {})),
        corpus=_corpus(settings, where, at),
        base_dir=base_dir,
        checkpoint=CheckpointConfig(**settings.get("checkpoint", {})),
        compute=ComputeConfig(**settings.get("compute", {})),
    )


def _corpus(settings: dict[str, Any], where: str, at: str) -> CorpusConfig | None:
    raw = settings.get("corpus")
    if raw is None:
        return None
    for key in CORPUS_FILES:
        if key not in raw:
            what = "DPR's passages TSV (id, text, title; psgs_w100.tsv)" if key == "passages" else \
                "DPR's questions file (question TAB a list of answers; nq-test.qa.csv)"
            raise GridError(where, _join(at, f"corpus.{key}"), f"missing; expected {what}")
    return CorpusConfig(**raw)


def _grad_cache(settings: dict[str, Any], where: str, at: str) -> GradCacheConfig:
    cache = GradCacheConfig(**settings.get("grad_cache", {}))
    batch_size = settings.get("train", {}).get("batch_size", TrainConfig.batch_size)
    if cache.chunk_size and batch_size == "auto":
        raise GridError(where, _join(at, "train.batch_size"), "expected a number with grad_cache: 'auto' probes plain batches; "
                        "with the gradient cache, memory depends on chunk_size and any batch size fits")
    return cache


def _encoders(settings: dict[str, Any], where: str, at: str) -> tuple[str, str]:
    if "encoder" in settings:
        if "question_encoder" in settings or "passage_encoder" in settings:
            raise GridError(where, _join(at, "encoder"), "expected either 'encoder' or a 'question_encoder'/'passage_encoder' pair, not both")
        return settings["encoder"], settings["encoder"]
    if "question_encoder" in settings and "passage_encoder" in settings:
        return settings["question_encoder"], settings["passage_encoder"]
    if "question_encoder" in settings or "passage_encoder" in settings:
        missing = "passage_encoder" if "question_encoder" in settings else "question_encoder"
        raise GridError(where, _join(at, missing), "missing; a question/passage pair needs both encoders")
    raise GridError(where, _join(at, "encoder"), "missing; expected a Hugging Face model name or a local folder")


def _reject_duplicates(cells: list[tuple[str, CellConfig]], where: str) -> None:
    seen: dict[str, str] = {}
    for key_path, cell in cells:
        if cell.cell_id in seen:
            raise GridError(
                where, key_path, f"duplicate cell: resolves to the same config as {seen[cell.cell_id]} ({cell.cell_id})"
            )
        seen[cell.cell_id] = key_path


def _missing_files(cells: list[CellConfig]) -> list[tuple[str, str]]:
    """Data files and local model folders (hub names cannot be checked offline) absent here."""
    missing = []
    is_file = functools.lru_cache(maxsize=None)(Path.is_file)  # 2,000 cells name the same few paths
    is_dir = functools.lru_cache(maxsize=None)(Path.is_dir)
    for cell in cells:
        for split in ("train", "dev"):
            written = getattr(cell.data, split)
            if written is not None and not is_file(cell.data_path(split)):
                fetch = f" ({written}: 'dpr-hpc prefetch' downloads it)" if is_name(written) else ""
                missing.append((f"data.{split}", f"{cell.data_path(split)}{fetch}"))
        for key in ("question_encoder", "passage_encoder"):
            name = getattr(cell, key)
            if cell.local_model(name) is not None and not is_dir(cell.local_model(name)):
                missing.append((key, f"{cell.model_path(name)} (a local model folder)"))
        for part in CORPUS_FILES if cell.corpus is not None else ():
            written = getattr(cell.corpus, part)
            if not is_file(cell.corpus_path(part)):
                fetch = f" ({written}: 'dpr-hpc prefetch' downloads it)" if is_name(written) else ""
                missing.append((f"corpus.{part}", f"{cell.corpus_path(part)}{fetch}"))
    return missing


def _name(value: Any, where: str, key_path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise GridError(where, key_path, f"expected a non-empty string, got {_type_name(value)}")
    return value


def _join(key_path: str, key: str) -> str:
    return f"{key_path}.{key}" if key_path else key


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )
