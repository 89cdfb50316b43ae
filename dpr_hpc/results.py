"""Result records: one JSON file per stage job, the only evidence that a stage is done.

A stage counts as complete when its record parses, matches the cell's current config hash,
carries the figures its stage must report, and the artifacts it lists still exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from dpr_hpc.errors import ResultInvalidError
from dpr_hpc.fsutil import read_json, write_json_atomic
from dpr_hpc.grid import CellConfig
from dpr_hpc.plan import StageJob

SCHEMA_VERSION = 1
REQUIRED_FIGURES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"timings": ("ttt_s",), "metrics": ("epoch_loss",)},
    "index": {"timings": ("encode_s", "index_build_s", "pei_s"), "metrics": ("num_passages",)},
    "infer": {"timings": ("ita_mean_ms", "ita_sd_ms"), "metrics": ("num_questions",)},
}


def make_record(
    cell: CellConfig,
    job: StageJob,
    *,
    metrics: dict[str, Any],
    timings: dict[str, Any],
    node: dict[str, Any],
    started_at: str,
    finished_at: str,
    artifacts: Sequence[str] = (),
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "cell_id": cell.cell_id,
        "config_hash": cell.config_hash,
        "stage": job.stage,
        "repeat": job.repeat,
        "config": cell.to_json(),
        "metrics": metrics,
        "timings": timings,
        "node": node,
        "started_at": started_at,
        "finished_at": finished_at,
        "artifacts": list(artifacts),
        "details": details or {},
    }


def write_record(path: Path, record: dict[str, Any]) -> None:
    write_json_atomic(path, record)


def load_record(path: Path, cell: CellConfig, job: StageJob) -> dict[str, Any]:
    """The record of `job`, or ResultInvalidError saying why it cannot be trusted."""
    try:
        record = read_json(path)
    except FileNotFoundError:
        raise ResultInvalidError(f"{path}: no result record") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultInvalidError(f"{path}: unreadable result record ({exc})") from None
    problem = _problem(record, cell, job, path.parent)
    if problem:
        raise ResultInvalidError(f"{path}: {problem}")
    return record


def is_complete(path: Path, cell: CellConfig, job: StageJob) -> bool:
    try:
        load_record(path, cell, job)
    except ResultInvalidError:
        return False
    return True


def _problem(record: Any, cell: CellConfig, job: StageJob, stage_dir: Path) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("schema") != SCHEMA_VERSION:
        return f"schema {record.get('schema')!r}, expected {SCHEMA_VERSION}"
    expected = {"cell_id": cell.cell_id, "config_hash": cell.config_hash, "stage": job.stage, "repeat": job.repeat}
    for key, value in expected.items():
        if record.get(key) != value:
            return f"{key} is {record.get(key)!r}, expected {value!r}"
    for section, names in REQUIRED_FIGURES[job.stage].items():
        figures = record.get(section)
        if not isinstance(figures, dict):
            return f"missing '{section}'"
        for name in names:
            if name not in figures:
                return f"missing {section}.{name}"
    for artifact in record.get("artifacts", []):
        if not (stage_dir / artifact).exists():
            return f"artifact {artifact} is missing"
    return None
