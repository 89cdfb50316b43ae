"""What a submit did, job by job, whichever backend ran it."""

from __future__ import annotations

from dataclasses import dataclass, field

from dpr_hpc.plan import StageJob


@dataclass
class SubmitReport:
    ran: list[StageJob] = field(default_factory=list)  # run here, or handed to the scheduler
    skipped: list[StageJob] = field(default_factory=list)  # a valid result exists
    active: list[StageJob] = field(default_factory=list)  # already pending or running in the scheduler
    failed: list[StageJob] = field(default_factory=list)
    blocked: list[StageJob] = field(default_factory=list)
    deferred: list[StageJob] = field(default_factory=list)  # over the cluster's submit limit this time

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked

    def summary(self, verb: str = "ran") -> str:
        parts = [f"{len(self.ran)} {verb}", f"{len(self.skipped)} already complete (skipped)"]
        if self.active:
            parts.append(f"{len(self.active)} already queued or running (left alone)")
        if self.deferred:
            parts.append(f"{len(self.deferred)} deferred (submit limit reached; run submit again later)")
        parts += [f"{len(self.failed)} failed", f"{len(self.blocked)} blocked"]
        return ", ".join(parts)
