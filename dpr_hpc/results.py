"""Result records: one JSON file per stage job, the only evidence that a stage is done, and
its provenance: the content of every input it read and the digest of every upstream record.

A record is checked, never trusted:
    missing      no record (ENOENT, and only that): the stage has not run
    unreadable   any other read error (EIO, ESTALE, a permission error, broken JSON): callers
                 stop and name the file; nothing is rerun on a guess
    invalid      wrong schema, stage, key or repeat, or a figure its stage must report is absent
    stale        an artifact is gone or has another size, an input's content changed, an
                 upstream record changed, went away or is itself not complete, or a rerun of
                 this very attempt was asked for (submit --force) and has not completed yet
    complete     everything above holds
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from dpr_hpc.content import ContentHashes, sha256_bytes, sha256_file
from dpr_hpc.fsutil import write_json_atomic
from dpr_hpc.provenance import now_iso
from dpr_hpc.grid import CellConfig
from dpr_hpc.plan import StageJob
from dpr_hpc.store import AttemptPaths, JobFolder, StageStore

SCHEMA_VERSION = 2
REQUIRED_FIGURES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"timings": ("ttt_s",), "metrics": ("epoch_loss",)},
    "index": {"timings": ("encode_s", "index_build_s", "pei_s"), "metrics": ("num_passages",)},
    "infer": {"timings": ("ita_mean_ms", "ita_sd_ms"), "metrics": ("num_questions",)},
}
# Artifacts up to this size are hashed when recorded and when checked; larger ones are checked
# by size (a checkpoint or a FAISS index of several GB would make `status` slow).
HASHED_ARTIFACT_BYTES = 1 << 20
DONE, MISSING, UNREADABLE, INVALID, STALE = "complete", "missing", "unreadable", "invalid", "stale"


@dataclass(frozen=True)
class RecordCheck:
    state: str
    reason: str = ""
    record: dict[str, Any] | None = None
    digest: str | None = None

    @property
    def complete(self) -> bool:
        return self.state == DONE

    @property
    def attempt(self) -> int | None:
        return self.record.get("attempt") if self.record else None


def make_record(
    cell: CellConfig,
    job: StageJob,
    *,
    attempt: int,
    inputs: dict[str, Any],
    upstream: dict[str, str],
    metrics: dict[str, Any],
    timings: dict[str, Any],
    node: dict[str, Any],
    started_at: str,
    finished_at: str,
    artifacts: dict[str, dict[str, Any]],
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "stage": job.stage,
        "key": job.key,
        "repeat": job.repeat,
        "attempt": attempt,
        "cell_id": cell.cell_id,
        "config": cell.to_json(),
        "inputs": inputs,
        "upstream": upstream,
        "metrics": metrics,
        "timings": timings,
        "node": node,
        "started_at": started_at,
        "finished_at": finished_at,
        "artifacts": artifacts,
        "details": details or {},
    }


def describe_artifacts(attempt: AttemptPaths, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Size (and SHA-256 where cheap) of each artifact, named relative to its attempt folder;
    a folder stands for every file in it."""
    described: dict[str, dict[str, Any]] = {}
    for name in names:
        path = attempt.dir / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            size = file.stat().st_size
            described[file.relative_to(attempt.dir).as_posix()] = {
                "bytes": size, "sha256": sha256_file(file) if size <= HASHED_ARTIFACT_BYTES else None,
            }
    return described


def write_record(folder: JobFolder, attempt: AttemptPaths, record: dict[str, Any], before_each: Callable[[], None] = lambda: None) -> None:
    """The attempt keeps its own copy; result.json switches to it in one rename. `before_each`
    (the job's claim check) raises when this writer may no longer write them."""
    before_each()
    write_json_atomic(attempt.record, record)
    before_each()
    write_json_atomic(folder.result, record)


def request_rerun(folder: JobFolder, attempt: int) -> None:
    """Ask for a rerun of a complete job (submit --force): its record reads stale until a new
    attempt completes, so every backend and the job itself treat it as any stale record, and
    the attempt it replaces stays on disk. A new record names another attempt, which answers
    the request; a job queued for hours, or requeued, still sees it until then."""
    write_json_atomic(folder.rerun_request, {"attempt": attempt, "requested_at": now_iso()})


class Records:
    """Checks of the store's records for one command, each made once: status, submit and
    collect ask for the same upstream record many times."""

    def __init__(self, store: StageStore, hashes: ContentHashes | None = None) -> None:
        self.store = store
        self.hashes = hashes or store.content_hashes()
        self._checks: dict[StageJob, RecordCheck] = {}

    def check(self, job: StageJob) -> RecordCheck:
        if job not in self._checks:
            self._checks[job] = self._check(job)
        return self._checks[job]

    def forget(self) -> None:
        """Drop every remembered check: after a job ran, its record and its dependants' differ."""
        self._checks.clear()

    def attempt_of(self, job: StageJob) -> AttemptPaths:
        """The complete attempt's folder of a job (whose check must be complete)."""
        check = self.check(job)
        if not check.complete:
            raise ValueError(f"{job.id} is {check.state}: {check.reason}")
        return self.store.job(job).attempt(check.attempt)

    def _check(self, job: StageJob) -> RecordCheck:
        folder = self.store.job(job)
        try:
            data = folder.result.read_bytes()
        except FileNotFoundError:
            return RecordCheck(MISSING)
        except OSError as exc:
            return RecordCheck(UNREADABLE, f"{folder.result}: {exc.strerror or exc}")
        try:
            record = json.loads(data)
        except ValueError as exc:
            return RecordCheck(UNREADABLE, f"{folder.result}: not valid JSON ({exc})")
        digest = sha256_bytes(data)
        problem = _invalid(record, job)
        if problem:
            return RecordCheck(INVALID, problem, record if isinstance(record, dict) else None, digest)
        stale = _rerun_requested(record, folder) or _damaged(record, folder) or _inputs_changed(record, self.hashes) or self._upstream_changed(record)
        if stale:
            return RecordCheck(STALE, stale, record, digest)
        return RecordCheck(DONE, "", record, digest)

    def _upstream_changed(self, record: dict[str, Any]) -> str | None:
        for job_id, digest in record.get("upstream", {}).items():
            stage, key, repeat = job_id.split("/")
            upstream = self.check(StageJob(stage, key, int(repeat.lstrip("r"))))
            if not upstream.complete:
                return f"its upstream {stage} {key[:8]} {repeat} is {upstream.state}" + (f" ({upstream.reason})" if upstream.reason else "")
            if upstream.digest != digest:
                return f"its upstream {stage} {key[:8]} {repeat} was rerun since (record changed)"
        return None


def _invalid(record: Any, job: StageJob) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("schema") != SCHEMA_VERSION:
        return f"schema {record.get('schema')!r}, expected {SCHEMA_VERSION}"
    for name, value in (("stage", job.stage), ("key", job.key), ("repeat", job.repeat)):
        if record.get(name) != value:
            return f"{name} is {record.get(name)!r}, expected {value!r}"
    if not isinstance(record.get("attempt"), int):
        return "no attempt number"
    for section, names in REQUIRED_FIGURES[job.stage].items():
        figures = record.get(section)
        if not isinstance(figures, dict):
            return f"missing '{section}'"
        for name in names:
            if name not in figures:
                return f"missing {section}.{name}"
    return None


def _rerun_requested(record: dict[str, Any], folder: JobFolder) -> str | None:
    try:
        request = json.loads(folder.rerun_request.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"its rerun request {folder.rerun_request} cannot be read ({exc}); remove it or submit --force again"
    if not isinstance(request, dict) or request.get("attempt") != record["attempt"]:
        return None
    return f"a rerun was asked for (submit --force, {request.get('requested_at', 'at an unknown time')})"


def _damaged(record: dict[str, Any], folder: JobFolder) -> str | None:
    attempt = folder.attempt(record["attempt"])
    for name, expected in record.get("artifacts", {}).items():
        path = attempt.dir / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"artifact {name} is missing"
        if size != expected.get("bytes"):
            return f"artifact {name} has {size} bytes, recorded {expected.get('bytes')}"
        if expected.get("sha256") and size <= HASHED_ARTIFACT_BYTES and sha256_file(path) != expected["sha256"]:
            return f"artifact {name} changed (SHA-256 differs from the record)"
    return None


def _inputs_changed(record: dict[str, Any], hashes: ContentHashes) -> str | None:
    for role, spec in record.get("inputs", {}).items():
        path = Path(spec["path"])
        if not path.exists():
            return f"its input {role} ({path}) is gone"
        try:
            now = hashes.folder(path) if spec.get("kind") == "folder" else hashes.file(path)
        except OSError:
            return f"its input {role} ({path}) is gone"
        if now != spec["sha256"]:
            return f"its input {role} ({path}) changed since it ran"
    return None
