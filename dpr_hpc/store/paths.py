"""The one owner of the stage store: where every stage output lives, by its stage key.

    <runs root>/store/
        content-hashes.json                 input content hashes, by path, size and mtime
        ledger.jsonl, ledger.lock           scheduler job ids per stage job, appended (ledger.py)
        <stage>/<key>/spec.json             the settings the stage runs with, its upstream keys, hub commits
        <stage>/<key>/r<repeat>/
            result.json                     the record of the current complete attempt
            rerun.json                      a forced rerun asked for (submit --force): the attempt it replaces
            claim.lock                      the one writer now at work (host, pid, SLURM job, heartbeat)
            jobs/                           submitit's scripts and logs, of every attempt (an array task's: links)
            attempts/a<n>/                  one attempt's outputs, never written once complete
                record.json                 its record, once complete (result.json's twin)
                jobs.json                   the scheduler jobs that worked on it (their logs are in jobs/)
                meter.json                  live count of its work (steps, passages) for a progress bar
                failed.json, interrupted.json
                train:  checkpoint/{question,passage}_encoder/, resume/, progress.json, losses.json, batch_size.json
                index:  shards/ and embeddings.npy (scratch, removed with the record written), index.faiss, passage_ids.npy
                infer:  rankings.npy, run.trec (the ranking as a TREC run), qrels.trec (the dev gold)
                encode-shard:  vectors.npy (fp32 or fp16), offsets.npy (each passage's byte offset
                               in the passages file: its global id), passage_ids.npy; shards/ (scratch)
                search-shard:  hit_scores.npy, hit_offsets.npy (each question's top-k in the shard)
                merge:  merged_scores.npy, merged_offsets.npy, run.trec (the corpus ranking)
        arrays/<group name>/                a job array's script, pickles, logs and <tag>.tasks.json
    <runs root>/cache/tokens/               tokenized data, shared by every grid
    <runs root>/cache/prepared/             data files parsed once into mapped columns (prepared.py)

Every grid under one runs root shares the store: a second grid that names a trained model
trains nothing. A rerun (a stale input, a damaged output) writes a new attempt, and its
record replaces result.json atomically once it is complete; earlier attempts stay on disk.
`submit --force` reruns a complete job the same way: rerun.json names the complete attempt it
replaces, which reads as stale until a new attempt's record takes its place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpr_hpc.inputs.content import ContentHashes
from dpr_hpc.fsutil import read_json, resolved, write_json_atomic
from dpr_hpc.planning.plan import StageJob

_ATTEMPT = re.compile(r"a(\d+)")


@dataclass(frozen=True)
class AttemptPaths:
    """One attempt's folder: the files a stage writes while it runs and keeps once complete."""

    dir: Path
    number: int

    @property
    def record(self) -> Path:
        return self.dir / "record.json"

    @property
    def failure(self) -> Path:
        return self.dir / "failed.json"

    @property
    def job_ids(self) -> Path:
        return self.dir / "jobs.json"

    @property
    def meter(self) -> Path:
        return self.dir / "meter.json"

    @property
    def interrupted(self) -> Path:
        return self.dir / "interrupted.json"

    @property
    def progress(self) -> Path:
        return self.dir / "progress.json"

    @property
    def resume(self) -> Path:
        return self.dir / "resume"

    @property
    def batch_size(self) -> Path:
        return self.dir / "batch_size.json"

    @property
    def losses(self) -> Path:
        return self.dir / "losses.json"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoint"

    @property
    def question_encoder(self) -> Path:
        return self.checkpoint / "question_encoder"

    @property
    def passage_encoder(self) -> Path:
        return self.checkpoint / "passage_encoder"

    def encoder(self, tower: str) -> Path:
        return self.question_encoder if tower == "question" else self.passage_encoder

    @property
    def shards(self) -> Path:
        return self.dir / "shards"

    @property
    def embeddings(self) -> Path:
        """The pool's embeddings in pool order, which the index is built from; discarded after."""
        return self.dir / "embeddings.npy"

    @property
    def index_file(self) -> Path:
        return self.dir / "index.faiss"

    @property
    def passage_ids(self) -> Path:
        return self.dir / "passage_ids.npy"

    @property
    def vectors(self) -> Path:
        """A corpus shard's passage vectors (encode-shard), fp32 or fp16 as the corpus asks."""
        return self.dir / "vectors.npy"

    @property
    def offsets(self) -> Path:
        """A corpus shard's passages by their byte offset in the passages file (their global ids)."""
        return self.dir / "offsets.npy"

    @property
    def hit_scores(self) -> Path:
        """Each question's top-k inner products in one corpus shard (search-shard)."""
        return self.dir / "hit_scores.npy"

    @property
    def hit_offsets(self) -> Path:
        """The passages (byte offsets; -1: none) behind `hit_scores`."""
        return self.dir / "hit_offsets.npy"

    @property
    def merged_scores(self) -> Path:
        return self.dir / "merged_scores.npy"

    @property
    def merged_offsets(self) -> Path:
        return self.dir / "merged_offsets.npy"

    @property
    def rankings(self) -> Path:
        return self.dir / "rankings.npy"

    @property
    def trec_run(self) -> Path:
        return self.dir / "run.trec"

    @property
    def trec_qrels(self) -> Path:
        return self.dir / "qrels.trec"


@dataclass(frozen=True)
class JobFolder:
    """One stage job's folder: its current record, its claim, its logs and its attempts."""

    dir: Path

    @property
    def result(self) -> Path:
        return self.dir / "result.json"

    @property
    def rerun_request(self) -> Path:
        return self.dir / "rerun.json"

    @property
    def claim(self) -> Path:
        return self.dir / "claim.lock"

    @property
    def jobs(self) -> Path:
        return self.dir / "jobs"

    @property
    def attempts(self) -> Path:
        return self.dir / "attempts"

    def logs(self) -> list[tuple[str, Path, Path]]:
        """Every job log pair (submitit writes <job id>_<task>_log.out and .err), oldest first,
        as (job id, stdout, stderr)."""
        found = []
        for stdout in self.jobs.glob("*_log.out"):
            job_id = stdout.name[: -len("_log.out")].rsplit("_", 1)[0]
            try:
                found.append((stdout.stat().st_mtime, job_id, stdout, stdout.with_suffix(".err")))
            except FileNotFoundError:  # an array task's link to a log SLURM has not opened yet
                continue
        return [(job_id, out, err) for _, job_id, out, err in sorted(found)]

    def attempt(self, number: int) -> AttemptPaths:
        return AttemptPaths(self.attempts / f"a{number}", number)

    def attempt_numbers(self) -> list[int]:
        try:
            names = [p.name for p in self.attempts.iterdir()]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_ATTEMPT.fullmatch, names) if m)

    def latest_attempt(self) -> AttemptPaths | None:
        numbers = self.attempt_numbers()
        return self.attempt(numbers[-1]) if numbers else None

    def working_attempt(self, complete_attempt: int | None) -> AttemptPaths:
        """Where a run writes: the newest attempt if it never completed (a requeued or failed
        run continues there, from its checkpoint or shards), else a new one. A complete
        attempt is never written into."""
        latest = self.latest_attempt()
        if latest is not None and latest.number != complete_attempt and not latest.record.exists():
            return latest
        fresh = self.attempt((latest.number if latest else 0) + 1)
        fresh.dir.mkdir(parents=True, exist_ok=True)
        return fresh


@dataclass(frozen=True)
class StageSpec:
    """What a stage job is handed through the store: the settings it runs with (one cell's;
    every cell sharing the key agrees on them) and the keys of the outputs it reads."""

    stage: str
    key: str
    cell: dict[str, Any]
    upstream: dict[str, str]
    # The commit of each hub model the stage loads, as its key names it (modeling/hub.py):
    # the job, offline, loads exactly that one.
    hub_revisions: dict[str, str] = field(default_factory=dict)
    # The job's slot in its cell's keys: its stage, or a shard stage and the shard it is
    # ("encode-shard#3"); the cell's settings name the corpus, this names the shard.
    slot: str = ""

    def to_json(self) -> dict[str, Any]:
        saved = {"stage": self.stage, "key": self.key, "cell": self.cell, "upstream": self.upstream, "hub_revisions": self.hub_revisions}
        if self.slot and self.slot != self.stage:  # absent for plain stages, so their spec.json stands
            saved["slot"] = self.slot
        return saved


@dataclass(frozen=True)
class StageStore:
    runs_root: Path

    @classmethod
    def at(cls, runs_root: Path) -> "StageStore":
        return cls(resolved(runs_root))  # once per distinct path: every job of a grid asks

    @property
    def root(self) -> Path:
        return self.runs_root / "store"

    @property
    def ledger_file(self) -> Path:
        return self.root / "ledger.jsonl"

    @property
    def ledger_lock(self) -> Path:
        return self.root / "ledger.lock"

    @property
    def token_cache(self) -> Path:
        return self.runs_root / "cache" / "tokens"

    @property
    def prepared_cache(self) -> Path:
        return self.runs_root / "cache" / "prepared"

    @property
    def hub_pins_file(self) -> Path:
        return self.root / "hub-pins.json"

    def hub_pins(self) -> dict[str, str]:
        """The commit each hub model is pinned to for every grid here (modeling/hub.py's HubPins)."""
        from dpr_hpc.inputs.hub import HubPins

        return HubPins(self.hub_pins_file).read()

    def content_hashes(self, remember: bool = True) -> ContentHashes:
        """The hashes a plan names inputs by, with this store's hub pins; `remember=False` (a
        dry run) writes no memo."""
        return ContentHashes(self.root / "content-hashes.json" if remember else None, self.hub_pins())

    def spec_file(self, stage: str, key: str) -> Path:
        return self.root / stage / key / "spec.json"

    def job(self, job: StageJob) -> JobFolder:
        return JobFolder(self.root / job.stage / job.key / f"r{job.repeat}")

    def array_jobs(self, name: str) -> Path:
        """submitit's folder for one job array (plan.ArrayGroup `name`): its sbatch script, its
        tasks' pickles and logs (each task's log is linked from its stage job's jobs/ folder),
        and one <tag>.tasks.json per submitted array naming the stage job each index runs."""
        parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in name.split("/") if part not in ("", ".", "..")]
        return self.root.joinpath("arrays", *parts or ["_"])

    def write_spec(self, spec: StageSpec) -> None:
        """Written by submit before the job is queued; rewritten only when it differs (settings
        outside the key, such as checkpoint intervals, may)."""
        path = self.spec_file(spec.stage, spec.key)
        try:
            if read_json(path) == spec.to_json():
                return
        except (OSError, ValueError):
            pass
        write_json_atomic(path, spec.to_json())

    def read_spec(self, stage: str, key: str) -> StageSpec:
        saved = read_json(self.spec_file(stage, key))
        return StageSpec(saved["stage"], saved["key"], saved["cell"], dict(saved["upstream"]), dict(saved.get("hub_revisions", {})),
                         saved.get("slot", saved["stage"]))
