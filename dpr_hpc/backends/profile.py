"""Cluster profiles (slurm_templates/*.yaml): the resources each stage job asks SLURM for.

    defaults: {partition: gpu, gres: "gpu:1", cpus_per_task: 8, mem_gb: 64, setup: [...]}
    stages:
      train: {time: "48:00:00", signal_delay_s: 600, max_requeues: 20}
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dpr_hpc.errors import GridError
from dpr_hpc.grid import STAGES


@dataclass(frozen=True)
class StageResources:
    partition: str | None = None
    gres: str | None = None
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time: str = "48:00:00"
    account: str | None = None
    qos: str | None = None
    setup: tuple[str, ...] = field(default_factory=tuple)
    # The warning signal comes this long before the time limit: time for the step in flight and
    # a checkpoint write (BERT-base towers with AdamW state are ~2.6 GB).
    signal_delay_s: int = 300
    # Automatic requeues after a time limit (preemptions do not count); then `submit` again.
    max_requeues: int = 20

    @property
    def time_min(self) -> int:
        return time_to_minutes(self.time)


def time_to_minutes(value: str | int) -> int:
    """SLURM's time formats: minutes, 'MM:SS', 'HH:MM:SS', 'D-HH:MM:SS' (rounded up to minutes)."""
    if isinstance(value, int):
        return value
    days, _, rest = value.rpartition("-") if "-" in value else ("0", "", value)
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts[-3:]
    return int(days) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


Resources = dict[str, StageResources]


def default_resources() -> Resources:
    return {stage: StageResources() for stage in STAGES}


def load_profile(path: Path, base: Resources | None = None) -> Resources:
    """Resources per stage from a profile file; every error names the file and the key."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise GridError(where, "", "cluster profile not found") from None
    except yaml.YAMLError as exc:
        raise GridError(where, "", f"YAML syntax error: {exc}") from None
    _check(raw, dict, where, "(top level)", "a mapping")
    return overlay(base or default_resources(), {k: v for k, v in raw.items() if k != "description"}, where, "")


def overlay(base: Resources, raw: Any, where: str, key_path: str, extra_keys: tuple[str, ...] = ()) -> Resources:
    """`defaults` on top of every stage of `base`, then each stage's own keys on top of that."""
    _check(raw, dict, where, key_path or "(top level)", "a mapping")
    allowed = ("defaults", "stages") + extra_keys
    for key in raw:
        if key not in allowed:
            raise GridError(where, _join(key_path, str(key)), f"unknown key; expected one of {', '.join(allowed)}")
    defaults = raw.get("defaults", {})
    stages = raw.get("stages", {})
    _check(stages, dict, where, _join(key_path, "stages"), "a mapping of stage names")
    for stage in stages:
        if stage not in STAGES:
            raise GridError(where, _join(key_path, f"stages.{stage}"), f"unknown stage; expected one of {', '.join(STAGES)}")
    return {
        stage: _resources(_resources(base[stage], defaults, where, _join(key_path, "defaults")), stages.get(stage, {}), where, _join(key_path, f"stages.{stage}"))
        for stage in STAGES
    }


def _join(key_path: str, key: str) -> str:
    return f"{key_path}.{key}" if key_path else key


def _resources(base: StageResources, raw: Any, where: str, key_path: str) -> StageResources:
    _check(raw, dict, where, key_path, "a mapping")
    names = {f.name for f in fields(StageResources)}
    for key, value in raw.items():
        if key not in names:
            raise GridError(where, f"{key_path}.{key}", f"unknown key; expected one of {', '.join(sorted(names))}")
        if key == "setup":
            _check(value, list, where, f"{key_path}.setup", "a list of shell lines")
        elif key in ("cpus_per_task", "signal_delay_s") and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise GridError(where, f"{key_path}.{key}", f"expected a positive integer, got {value!r}")
        elif key == "max_requeues" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise GridError(where, f"{key_path}.{key}", f"expected an integer >= 0, got {value!r}")
        elif key == "time":
            try:
                time_to_minutes(value)
            except (ValueError, AttributeError):
                raise GridError(where, f"{key_path}.time", f"expected a SLURM time such as '48:00:00', got {value!r}") from None
    values = {k: tuple(v) if k == "setup" else (str(v) if k == "time" else v) for k, v in raw.items()}
    return replace(base, **values)


def _check(value: Any, kind: type, where: str, key_path: str, expected: str) -> None:
    if not isinstance(value, kind):
        raise GridError(where, key_path, f"expected {expected}")
