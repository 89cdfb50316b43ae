"""The one owner of the run-folder layout; nothing else builds these paths.

    <runs root>/<grid name>/
        plan.json                                   the expanded grid, cells with their configs
        submit.lock                                 held while a local submit runs
        ledger.json, ledger.lock                    SLURM job ids per stage job (ledger.py)
        cache/tokens/                               tokenized data, one entry per tokenizer and file
        cells/<cell id>/<stage>/r<repeat>/
            result.json                             the validated record (its presence = done)
            failed.json | running.json | interrupted.json   markers written by the stage runner
            jobs/                                   submitit's pickles and logs
        cells/<cell id>/train/r0/checkpoint/{question_encoder,passage_encoder}/
        cells/<cell id>/train/r0/resume/step-<n>.{pt,json}   full training state while it runs
        cells/<cell id>/train/r0/progress.json, losses.json  position while running; per-step losses
        cells/<cell id>/index/r<n>/shards/                 passage embeddings as they are encoded
        cells/<cell id>/index/r<n>/{index.faiss,passage_ids.json}
        cells/<cell id>/infer/r<n>/rankings.npy
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpr_hpc.plan import StageJob

DEFAULT_RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class StagePaths:
    dir: Path

    @property
    def result(self) -> Path:
        return self.dir / "result.json"

    @property
    def failure(self) -> Path:
        return self.dir / "failed.json"

    @property
    def running(self) -> Path:
        return self.dir / "running.json"

    @property
    def interrupted(self) -> Path:
        return self.dir / "interrupted.json"

    @property
    def jobs(self) -> Path:
        return self.dir / "jobs"

    @property
    def progress(self) -> Path:
        return self.dir / "progress.json"

    @property
    def resume(self) -> Path:
        return self.dir / "resume"

    @property
    def shards(self) -> Path:
        return self.dir / "shards"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def for_grid(cls, grid_name: str, runs_root: Path = DEFAULT_RUNS_ROOT) -> "RunLayout":
        return cls(Path(runs_root).resolve() / grid_name)

    @property
    def plan_file(self) -> Path:
        return self.root / "plan.json"

    @property
    def submit_lock(self) -> Path:
        return self.root / "submit.lock"

    def cell_dir(self, cell_id: str) -> Path:
        return self.root / "cells" / cell_id

    def stage(self, job: StageJob) -> StagePaths:
        return StagePaths(self.cell_dir(job.cell_id) / job.stage / f"r{job.repeat}")

    def checkpoint_dir(self, cell_id: str) -> Path:
        return self.stage(StageJob(cell_id, "train", 0)).dir / "checkpoint"

    def question_encoder_dir(self, cell_id: str) -> Path:
        return self.checkpoint_dir(cell_id) / "question_encoder"

    def passage_encoder_dir(self, cell_id: str) -> Path:
        return self.checkpoint_dir(cell_id) / "passage_encoder"

    @property
    def token_cache(self) -> Path:
        """Tokenized data shared by every cell of the grid (dpr_hpc.modeling.token_cache)."""
        return self.root / "cache" / "tokens"

    def index_file(self, cell_id: str, repeat: int = 0) -> Path:
        return self.stage(StageJob(cell_id, "index", repeat)).dir / "index.faiss"

    def passage_ids_file(self, cell_id: str, repeat: int = 0) -> Path:
        return self.stage(StageJob(cell_id, "index", repeat)).dir / "passage_ids.json"

    def rankings_file(self, job: StageJob) -> Path:
        return self.stage(job).dir / "rankings.npy"
