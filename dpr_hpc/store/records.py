"""Result records: one JSON file per stage job, the only evidence that a stage is done, and
its provenance: the content of every input it read and the digest of every upstream record.

A record is checked, never trusted:
    missing      no record (ENOENT, and only that): the stage has not run
    unreadable   any other read error (EIO, ESTALE, a permission error, broken JSON), of the
                 record or of anything it is checked against (an artifact, an input, an
                 upstream record, a rerun request): callers stop and name the file; nothing is
                 rerun on a guess
    invalid      wrong schema, stage, key or repeat, or a figure its stage must report is absent
    stale        an artifact is gone (ENOENT) or has another size, an input's content changed
                 or is gone, an upstream record changed, went away or is itself not complete,
                 or a rerun of this very attempt was asked for (submit --force) and has not
                 completed yet
    complete     everything above holds

Inputs are compared by content, role by role (train data, dev data, a local encoder folder):
the SHA-256 the record holds against the file the current plan names for that role, wherever
it lies now. A data folder moved, and the grid edited to its new path, leaves every record
complete; the path a record names is only where the input was when it ran.

The runner writes an attempt's record.json, then result.json. An attempt whose record.json
checks out while result.json is missing, or names an earlier attempt, is the job's current
record (a crash between the two writes must not rerun a 48 h training); `promote` writes its
result.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from dpr_hpc.inputs.content import ContentHashes, sha256_bytes, sha256_file
from dpr_hpc.fsutil import write_bytes_atomic, write_json_atomic
from dpr_hpc.provenance import now_iso
from dpr_hpc.grid import CellConfig
from dpr_hpc.grid.config import cell_from_json
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.planning.stage_keys import stage_inputs
from dpr_hpc.store.paths import AttemptPaths, JobFolder, StageStore

SCHEMA_VERSION = 2
REQUIRED_FIGURES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"timings": ("ttt_s",), "metrics": ("epoch_loss",)},
    "index": {"timings": ("encode_s", "index_build_s", "pei_s"), "metrics": ("num_passages",)},
    "infer": {"timings": ("ita_mean_ms", "ita_sd_ms"), "metrics": ("num_questions",)},
    "encode-shard": {"timings": ("encode_s",), "metrics": ("num_passages", "shard")},
    "search-shard": {"timings": ("search_s",), "metrics": ("num_questions", "num_passages", "shard")},
    "merge": {"timings": ("merge_s",), "metrics": ("num_questions", "shards")},
}
# Artifacts up to this size are hashed when recorded and when checked; larger ones are checked
# by size (a checkpoint or a FAISS index of several GB would make `status` slow).
HASHED_ARTIFACT_BYTES = 1 << 20
DONE, MISSING, UNREADABLE, INVALID, STALE = "complete", "missing", "unreadable", "invalid", "stale"
# The prepared-data kind (dpr_hpc.inputs.prepared) holding each data role's parsed content.
PREPARED_KIND = {"train_data": "train", "dev_data": "dev"}


class _Unreadable(Exception):
    """Something a record is checked against cannot be read for another reason than ENOENT."""


def _unreadable(what: str, path: Path, error: OSError) -> _Unreadable:
    return _Unreadable(f"{what} {path}: {error.strerror or error}")


@dataclass(frozen=True)
class RecordCheck:
    state: str
    reason: str = ""
    record: dict[str, Any] | None = None
    digest: str | None = None
    # The attempt whose record.json this check read because result.json is missing or names an
    # earlier attempt (a crash between the runner's two writes); `promote` writes its result.json.
    unpromoted: AttemptPaths | None = None

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
    collect ask for the same upstream record many times. `plan` names the inputs a record's
    content is compared with (the job's spec in the store, for jobs it does not plan)."""

    def __init__(self, store: StageStore, hashes: ContentHashes | None = None, plan: Plan | None = None) -> None:
        self.store = store
        self.hashes = hashes or store.content_hashes()
        self.plan = plan
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
        current = self._check_file(job, folder.result)
        if current.complete or current.state == UNREADABLE:
            return current
        newer = self._unpromoted(job, folder, current)
        return newer or current

    def _unpromoted(self, job: StageJob, folder: JobFolder, current: RecordCheck) -> RecordCheck | None:
        """The newest attempt after the current record's whose own record.json checks out."""
        try:
            numbers = folder.attempt_numbers()
        except OSError as exc:
            return RecordCheck(UNREADABLE, f"{folder.attempts}: {exc.strerror or exc}")
        for number in reversed(numbers):
            if current.attempt is not None and number <= current.attempt:
                break
            attempt = folder.attempt(number)
            check = self._check_file(job, attempt.record)
            if check.complete and check.attempt == number:
                return RecordCheck(DONE, "", check.record, check.digest, unpromoted=attempt)
            if check.state == UNREADABLE:
                return check
        return None

    def _check_file(self, job: StageJob, path: Path) -> RecordCheck:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return RecordCheck(MISSING)
        except OSError as exc:
            return RecordCheck(UNREADABLE, f"{path}: {exc.strerror or exc}")
        try:
            record = json.loads(data)
        except ValueError as exc:
            return RecordCheck(UNREADABLE, f"{path}: not valid JSON ({exc})")
        digest = sha256_bytes(data)
        problem = _invalid(record, job)
        if problem:
            return RecordCheck(INVALID, problem, record if isinstance(record, dict) else None, digest)
        folder = self.store.job(job)
        try:
            stale = (_rerun_requested(record, folder) or _damaged(record, folder) or self._inputs_changed(job, record)
                     or self._upstream_changed(record))
        except _Unreadable as exc:
            return RecordCheck(UNREADABLE, str(exc), record, digest)
        if stale:
            return RecordCheck(STALE, stale, record, digest)
        return RecordCheck(DONE, "", record, digest)

    def _upstream_changed(self, record: dict[str, Any]) -> str | None:
        for job_id, digest in record.get("upstream", {}).items():
            stage, key, repeat = job_id.split("/")
            upstream = self.check(StageJob(stage, key, int(repeat.lstrip("r"))))
            if upstream.state == UNREADABLE:
                raise _Unreadable(f"its upstream {stage} {key[:8]} {repeat}: {upstream.reason}")
            if not upstream.complete:
                return f"its upstream {stage} {key[:8]} {repeat} is {upstream.state}" + (f" ({upstream.reason})" if upstream.reason else "")
            if upstream.digest != digest:
                return f"its upstream {stage} {key[:8]} {repeat} was rerun since (record changed)"
        return None

    def _inputs_changed(self, job: StageJob, record: dict[str, Any]) -> str | None:
        """Each input's recorded SHA-256 against the content of the file the plan names for its
        role now. Gone means ENOENT, and only where the prepared-data cache does not hold that
        content either (a purged scratch copy); any other error is unreadable, never stale."""
        planned = self._planned_inputs(job)
        for role, spec in record.get("inputs", {}).items():
            kind, path = planned.get(role, (spec.get("kind", "file"), Path(spec["path"])))
            try:
                now = self.hashes.folder(path) if kind == "folder" else self.hashes.file(path)
            except FileNotFoundError:
                if self._prepared_holds(role, spec["sha256"]):
                    continue
                return f"its input {role} ({path}) is gone"
            except OSError as exc:
                raise _unreadable(f"its input {role}:", Path(exc.filename or path), exc) from None
            if now != spec["sha256"]:
                return f"its input {role} ({path}) changed since it ran"
        return None

    def _planned_inputs(self, job: StageJob) -> dict[str, tuple[str, Path]]:
        """The inputs by role as the plan names them now, else as the job's spec does (a
        runner, or a key no plan here names); {} where neither is known."""
        if self.plan is not None and self.plan.has_key(job.stage, job.key):
            return stage_inputs(self.plan.spec_cell(job), job.stage)
        spec_file = self.store.spec_file(job.stage, job.key)
        try:
            return stage_inputs(cell_from_json(self.store.read_spec(job.stage, job.key).cell), job.stage)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise _unreadable("its spec", spec_file, exc) from None
        except (ValueError, KeyError, TypeError):
            return {}  # a damaged spec: the paths the record names are all there is

    def _prepared_holds(self, role: str, sha256: str) -> bool:
        from dpr_hpc.inputs.prepared import holds

        kind = PREPARED_KIND.get(role)
        try:
            return kind is not None and holds(self.store.prepared_cache, sha256, kind)
        except OSError as exc:
            raise _unreadable("the prepared data of", self.store.prepared_cache, exc) from None


def promote(folder: JobFolder, check: RecordCheck) -> bool:
    """Make an unpromoted attempt's record (a crash between its record.json and result.json)
    the job's result.json: the same bytes, so the digests its dependants record agree. Returns
    whether it wrote one."""
    if check.unpromoted is None or not check.complete:
        return False
    data = check.unpromoted.record.read_bytes()
    if sha256_bytes(data) != check.digest:
        return False  # rewritten since it was checked: the next check decides again
    write_bytes_atomic(folder.result, data)
    return True


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
    except OSError as exc:
        raise _unreadable("its rerun request", folder.rerun_request, exc) from None
    except ValueError as exc:
        raise _Unreadable(f"its rerun request {folder.rerun_request}: not valid JSON ({exc}); remove it or submit --force again") from None
    if not isinstance(request, dict) or request.get("attempt") != record["attempt"]:
        return None
    return f"a rerun was asked for (submit --force, {request.get('requested_at', 'at an unknown time')})"


def _damaged(record: dict[str, Any], folder: JobFolder) -> str | None:
    """Only ENOENT makes an artifact missing; an artifact that cannot be read is unreadable."""
    attempt = folder.attempt(record["attempt"])
    for name, expected in record.get("artifacts", {}).items():
        path = attempt.dir / name
        try:
            size = os.stat(path).st_size
            changed = bool(expected.get("sha256")) and size == expected.get("bytes") and size <= HASHED_ARTIFACT_BYTES and sha256_file(path) != expected["sha256"]
        except FileNotFoundError:
            return f"artifact {name} is missing"
        except OSError as exc:
            raise _unreadable("its artifact", path, exc) from None
        if size != expected.get("bytes"):
            return f"artifact {name} has {size} bytes, recorded {expected.get('bytes')}"
        if changed:
            return f"artifact {name} changed (SHA-256 differs from the record)"
    return None
