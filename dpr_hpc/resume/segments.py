"""Training segments: one per process that advanced a training, with where it ran and how long
it trained. TTT is their sum; queue waits, restarts and checkpoint writes fall outside them."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from dpr_hpc.provenance import now_iso

# How a segment ended. One still "running" in a checkpoint that is being resumed was killed after
# that checkpoint (kill -9, node failure): its steps after it are lost and are trained again.
RUNNING, FINISHED, KILLED = "running", "finished", "killed after its last checkpoint"


@dataclass
class Segment:
    hostname: str
    job_id: str | None
    slurm_restart_count: int
    gpu_name: str | None
    started_at: str
    first_step: int
    steps: int = 0
    train_s: float = 0.0
    checkpoint_s: float = 0.0
    ended_at: str = ""
    ended_by: str = RUNNING

    @classmethod
    def start(cls, first_step: int, gpu_name: str | None) -> "Segment":
        return cls(
            hostname=socket.gethostname(),
            job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            gpu_name=gpu_name,
            started_at=now_iso(),
            first_step=first_step,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SegmentLog:
    segments: list[Segment] = field(default_factory=list)

    @classmethod
    def from_json(cls, rows: list[dict[str, Any]]) -> "SegmentLog":
        segments = [Segment(**row) for row in rows]
        for segment in segments:
            if segment.ended_by == RUNNING:
                segment.ended_by = KILLED
        return cls(segments)

    @property
    def current(self) -> Segment:
        return self.segments[-1]

    @property
    def train_s(self) -> float:
        return sum(s.train_s for s in self.segments)

    @property
    def restarts(self) -> int:
        return max(0, len(self.segments) - 1)

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.segments]
