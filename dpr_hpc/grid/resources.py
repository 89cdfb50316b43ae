"""The SLURM resources of a stage job, and the validation of every place they are written:
cluster profiles (slurm_templates/*.yaml) and a grid's `slurm:` section.

    defaults: {partition: gpu, gres: "gpu:1", cpus_per_task: 8, mem_gb: 64, setup: [...]}
    stages:
      train: {time: "48:00:00", signal_delay_s: 600, max_requeues: 20}

Placement, mail and pass-through keys (constraint, exclude, nodelist, exclusive, reservation,
mail_type, mail_user, comment, sbatch_extra) are checked against SLURM's own grammar for each.

Values that reach `#SBATCH` lines (partition, gres, account, qos, the memory, the time, ...) must
match a SLURM-safe pattern: a newline would end the directive and start a shell command, and
sbatch stops reading directives there, silently dropping `--time` and `--signal`. `setup` lines
are shell by design; like the grid and profile files themselves, they are code to be trusted.

This module lives with the grid (which carries a `slurm:` section) and knows nothing of the
backends; dpr_hpc.backends.profile resolves a grid's resources from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dpr_hpc.errors import GridError, UsageError
from dpr_hpc.grid.config import ALL_STAGES as STAGES  # the corpus stages have resources of their own too

# Partition lists ("gpu,gpu-long"), GRES ("gpu:a100:1"), account, QOS and reservation names.
SBATCH_SAFE = re.compile(r"[A-Za-z0-9_.,:=+@%/-]+")
SBATCH_SAFE_EXPECTED = "a SLURM name (letters, digits and _ . , : = + @ % / -; no spaces, newlines or control characters)"
# A feature expression (--constraint): features joined by & | , with brackets, parentheses and
# counts ("a100&ib", "[rack1|rack2]", "gpu*2"). sbatch reads it, never a shell, and submitit
# quotes it on its #SBATCH line; what must not pass is a newline or a space.
SLURM_CONSTRAINT = re.compile(r"[A-Za-z0-9_.:=+@%/,&|*\[\]()-]+")
# A SLURM hostlist (--nodelist, --exclude): names with optional bracketed ranges, comma-joined.
_HOST = r"[A-Za-z0-9][A-Za-z0-9_.-]*(?:\[\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*\][A-Za-z0-9_.-]*)*"
SLURM_HOSTLIST = re.compile(rf"{_HOST}(?:,{_HOST})*")
HOSTLIST_EXPECTED = "a SLURM hostlist such as 'gpu[01-04],gpu07' (or a list of host names)"
# sbatch --mail-type's values (comma-separated).
MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
              "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
EXCLUSIVE_MODES = ("user", "mcs")
SBATCH_LONG_OPTION = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# sbatch options dpr-hpc (or submitit for it) writes itself: the time limit and its warning,
# requeueing, the job name, logs and dependencies it reads back. sbatch_extra may not set them
# (nor --comment, which carries the tag a submit finds its jobs by: the `comment` key joins it).
SBATCH_OPTIONS_SET_HERE = ("time", "signal", "requeue", "no-requeue", "job-name", "output", "error",
                           "open-mode", "dependency", "kill-on-invalid-dep", "hold", "array", "wckey", "nodes", "export")
# sbatch options a profile key of its own sets: written there, they are validated as that key.
SBATCH_OPTION_KEYS = {"partition": "partition", "gres": "gres", "cpus-per-task": "cpus_per_task", "mem": "mem_gb",
                      "account": "account", "qos": "qos", "constraint": "constraint", "exclude": "exclude",
                      "nodelist": "nodelist", "exclusive": "exclusive", "reservation": "reservation",
                      "mail-type": "mail_type", "mail-user": "mail_user", "comment": "comment"}
# SLURM's --mem: an integer with an optional unit (megabytes without one).
SLURM_MEMORY = re.compile(r"[1-9][0-9]*[KMGT]?B?", re.IGNORECASE)
# SLURM's time formats (sbatch --time): each pattern with the fields it names, in order.
TIME_FORMATS: tuple[tuple[re.Pattern, tuple[str, ...]], ...] = (
    (re.compile(r"(\d+)"), ("minutes",)),
    (re.compile(r"(\d+):(\d+)"), ("minutes", "seconds")),
    (re.compile(r"(\d+):(\d+):(\d+)"), ("hours", "minutes", "seconds")),
    (re.compile(r"(\d+)-(\d+)"), ("days", "hours")),
    (re.compile(r"(\d+)-(\d+):(\d+)"), ("days", "hours", "minutes")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)"), ("days", "hours", "minutes", "seconds")),
)
TIME_EXPECTED = ("a SLURM time: 'MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM' or 'D-HH:MM:SS' "
                 "(quoted), or whole minutes")


@dataclass(frozen=True)
class StageResources:
    partition: str | None = None
    gres: str | None = None
    cpus_per_task: int = 1
    mem_gb: float | str | None = None  # gigabytes, or a SLURM memory string such as "500M"
    time: str = "48:00:00"
    account: str | None = None
    qos: str | None = None
    setup: tuple[str, ...] = field(default_factory=tuple)
    # The warning signal comes this long before the time limit: time for the step in flight and
    # a checkpoint write (BERT-base towers with AdamW state are ~2.6 GB).
    signal_delay_s: int = 300
    # Automatic requeues after a time limit (preemptions do not count); then `submit` again.
    max_requeues: int = 20
    # Where the job may run: node features, hosts to avoid or to use, a node of its own (a
    # timing stage sharing a node with another job times both), a reservation.
    constraint: str | None = None
    exclude: str | None = None
    nodelist: str | None = None
    exclusive: bool | str = False
    reservation: str | None = None
    mail_type: str | None = None
    mail_user: str | None = None
    # Joined to the tag dpr-hpc's own comment carries (scheduler.job_comment), never replacing it.
    comment: str | None = None
    # Other long sbatch options, by name without the dashes: {"gpu-bind": "closest"}.
    sbatch_extra: tuple[tuple[str, str | int | bool], ...] = ()

    @property
    def time_min(self) -> int:
        return time_to_minutes(self.time)

    @property
    def sbatch_mem(self) -> str | None:
        """--mem's value: SLURM takes whole numbers only, so a fraction of a GB is given in MB."""
        if self.mem_gb is None or isinstance(self.mem_gb, str):
            return self.mem_gb
        if float(self.mem_gb).is_integer():
            return f"{int(self.mem_gb)}GB"
        return f"{math.ceil(self.mem_gb * 1024)}MB"


Resources = dict[str, StageResources]


def time_to_minutes(value: str | int) -> int:
    """Minutes of a SLURM time (seconds rounded up), as sbatch reads it: '1-12' is 1 day
    12 hours. Raises ValueError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError("a time limit must be at least one minute")
        return value
    if not isinstance(value, str):
        raise ValueError("not a string or whole minutes")
    for pattern, names in TIME_FORMATS:
        match = pattern.fullmatch(value.strip())
        if match:
            parts = dict(zip(names, (int(g) for g in match.groups())))
            _check_time_fields(parts, names[0])
            seconds = parts.get("seconds", 0)
            minutes = parts.get("days", 0) * 1440 + parts.get("hours", 0) * 60 + parts.get("minutes", 0) + (1 if seconds else 0)
            if minutes < 1:
                raise ValueError("a time limit must be at least one minute (0 means no limit to SLURM)")
            return minutes
    raise ValueError("not one of these forms")


def _check_time_fields(parts: dict[str, int], leading: str) -> None:
    """The leading field may be any size ('90:00' is 90 minutes); the others are clock fields."""
    bounds = {"hours": 24, "minutes": 60, "seconds": 60}
    for name, value in parts.items():
        if name != leading and name in bounds and value >= bounds[name]:
            raise ValueError(f"{name} must be below {bounds[name]}, got {value}")


def default_resources() -> Resources:
    return {stage: StageResources() for stage in STAGES}


class _NoSexagesimalLoader(yaml.SafeLoader):
    """YAML 1.1 reads an unquoted 48:00:00 as the base-60 integer 172800, which as minutes is
    120 days; here it stays the string '48:00:00', which is what the user wrote."""


def _int_or_clock(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | str:
    text = loader.construct_scalar(node)
    return text if ":" in text else yaml.SafeLoader.construct_yaml_int(loader, node)


def _float_or_clock(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | str:
    text = loader.construct_scalar(node)
    return text if ":" in text else yaml.SafeLoader.construct_yaml_float(loader, node)


class _NoSexagesimalCLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The same reading through libyaml's parser, where PyYAML was built with it: a grid of
    2,000 cells parses in a fraction of the pure-Python parser's seconds."""


for _loader in (_NoSexagesimalLoader, _NoSexagesimalCLoader):
    _loader.add_constructor("tag:yaml.org,2002:int", _int_or_clock)
    _loader.add_constructor("tag:yaml.org,2002:float", _float_or_clock)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, except that clock-like scalars (48:00:00, 1:30) stay strings. Read with
    the C loader where it is installed; a text it rejects is read again by the pure-Python one,
    whose error (its words, line and column) is the one the user sees, with or without libyaml."""
    if getattr(yaml, "__with_libyaml__", False):
        try:
            return yaml.load(text, Loader=_NoSexagesimalCLoader)  # noqa: S506 (a CSafeLoader subclass)
        except yaml.YAMLError:
            pass
    return yaml.load(text, Loader=_NoSexagesimalLoader)  # noqa: S506 (a SafeLoader subclass)


def resolve(profile: Path | None, overrides: dict[str, Any], where: str) -> Resources:
    """A profile file's resources (SLURM's defaults without one), with a grid's `slurm:`
    overrides (read from `where`) on top."""
    base = read_profile(profile) if profile else default_resources()
    return overlay(base, overrides, where, "slurm")


def read_profile(path: Path, base: Resources | None = None) -> Resources:
    """Resources per stage from a profile file; every error names the file and the key."""
    where = str(path)
    try:
        raw = load_yaml(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise GridError(where, "", "cluster profile not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(where, "", f"cannot read the cluster profile ({exc})") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise GridError(where, "", f"YAML syntax error: {problem}") from None
    _check(raw, dict, where, "(top level)", "a mapping")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise GridError(where, "description", f"expected a string, got {description!r}")
    return overlay(base or default_resources(), {k: v for k, v in raw.items() if k != "description"}, where, "")


def overlay(base: Resources, raw: Any, where: str, key_path: str, extra_keys: tuple[str, ...] = ()) -> Resources:
    """`defaults` on top of every stage of `base`, then each stage's own keys on top of that;
    then each stage's warning must come before its time limit."""
    _check(raw, dict, where, key_path or "(top level)", "a mapping")
    allowed = ("defaults", "stages") + extra_keys
    for key in raw:
        if key not in allowed:
            raise GridError(where, _join(key_path, str(key)), f"unknown key; expected one of {', '.join(allowed)}")
    defaults = raw.get("defaults") or {}
    stages = raw.get("stages") or {}
    _check(stages, dict, where, _join(key_path, "stages"), "a mapping of stage names")
    for stage in stages:
        if stage not in STAGES:
            raise GridError(where, _join(key_path, f"stages.{stage}"), f"unknown stage; expected one of {', '.join(STAGES)}")
    merged = {}
    for stage in STAGES:
        with_defaults = _resources(base[stage], defaults, where, _join(key_path, "defaults"))
        own = stages.get(stage) or {}
        merged[stage] = _resources(with_defaults, own, where, _join(key_path, f"stages.{stage}"))
        if merged[stage].signal_delay_s >= merged[stage].time_min * 60:
            source = f"stages.{stage}" if {"signal_delay_s", "time"} & set(own) else "defaults"
            raise GridError(
                where, _join(key_path, f"{source}.signal_delay_s"),
                f"the {stage} stage's warning ({merged[stage].signal_delay_s} s) must come before its time limit "
                f"({merged[stage].time} = {merged[stage].time_min * 60} s)",
            )
    return merged


def _join(key_path: str, key: str) -> str:
    return f"{key_path}.{key}" if key_path else key


def _resources(base: StageResources, raw: Any, where: str, key_path: str) -> StageResources:
    _check(raw, dict, where, key_path, "a mapping")
    names = {f.name for f in fields(StageResources)}
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise GridError(where, f"{key_path}.{key}", f"unknown key; expected one of {', '.join(sorted(names))}")
        values[key] = _field_value(key, value, where, f"{key_path}.{key}")
    return replace(base, **values)


def _field_value(key: str, value: Any, where: str, key_path: str) -> Any:
    """One profile field, typed; raises GridError naming the key and what it expects."""
    def fail(expected: str) -> GridError:
        return GridError(where, key_path, f"expected {expected}, got {value!r}")

    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key in ("partition", "gres", "account", "qos", "reservation", "comment"):
        if value is not None and not (isinstance(value, str) and SBATCH_SAFE.fullmatch(value)):
            raise fail(SBATCH_SAFE_EXPECTED)
        return value
    if key == "constraint":
        if value is not None and not (isinstance(value, str) and SLURM_CONSTRAINT.fullmatch(value)):
            raise fail("a SLURM feature expression such as 'a100&ib' or '[rack1|rack2]' (no spaces, newlines or quotes)")
        return value
    if key in ("exclude", "nodelist"):
        hostlist = ",".join(value) if isinstance(value, list) and all(isinstance(h, str) for h in value) else value
        if hostlist is not None and not (isinstance(hostlist, str) and is_hostlist(hostlist)):
            raise fail(HOSTLIST_EXPECTED)
        return hostlist
    if key == "exclusive":
        if not (isinstance(value, bool) or value in EXCLUSIVE_MODES):
            raise fail(f"true, false, {' or '.join(repr(m) for m in EXCLUSIVE_MODES)}")
        return value
    if key == "mail_type":
        listed = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else None
        if value is not None and not (listed and all(isinstance(t, str) and t.strip().upper() in MAIL_TYPES for t in listed)):
            raise fail(f"one or more of {', '.join(MAIL_TYPES)} (comma-separated or a list)")
        return None if value is None else ",".join(t.strip().upper() for t in listed)
    if key == "mail_user":
        if value is not None and not (isinstance(value, str) and EMAIL.fullmatch(value)):
            raise fail("an email address")
        return value
    if key == "sbatch_extra":
        return _sbatch_extra(value, where, key_path)
    if key == "setup":
        if not isinstance(value, list) or not all(isinstance(line, str) and _one_line(line) for line in value):
            raise fail("a list of shell lines (strings without newlines or control characters)")
        return tuple(value)
    if key == "cpus_per_task" or key == "signal_delay_s":
        if not is_int or value < 1:
            raise fail("a positive integer")
        return value
    if key == "max_requeues":
        if not is_int or value < 0:
            raise fail("an integer >= 0")
        return value
    if key == "mem_gb":
        if value is None or (isinstance(value, str) and SLURM_MEMORY.fullmatch(value)):
            return value
        if (is_int or isinstance(value, float)) and math.isfinite(value) and value > 0:
            return value
        raise fail("a positive number of gigabytes, or a SLURM memory string such as '500M' or '64G'")
    if key == "time":
        try:
            time_to_minutes(value)
        except ValueError as exc:
            raise GridError(where, key_path, f"expected {TIME_EXPECTED}; got {value!r}: {exc}") from None
        return str(value).strip()
    raise AssertionError(f"no validation for profile key {key}")  # a new StageResources field


def _sbatch_extra(value: Any, where: str, key_path: str) -> tuple[tuple[str, str | int | bool], ...]:
    """Other long sbatch options: `true` gives a bare flag, a string or integer its value."""
    _check(value, dict, where, key_path, "a mapping of long sbatch option names to values")
    options = []
    for name, option in value.items():
        at = f"{key_path}.{name}"
        if not (isinstance(name, str) and SBATCH_LONG_OPTION.fullmatch(name)):
            raise GridError(where, at, "expected a long sbatch option name without its dashes, such as gpu-bind")
        if name in SBATCH_OPTIONS_SET_HERE:
            raise GridError(where, at, f"expected an option dpr-hpc does not set itself; --{name} is its own "
                            f"({', '.join(SBATCH_OPTIONS_SET_HERE)})")
        if name in SBATCH_OPTION_KEYS:
            raise GridError(where, at, f"expected an option without a profile key; set --{name} as {SBATCH_OPTION_KEYS[name]}")
        valid = option is True or (isinstance(option, int) and not isinstance(option, bool)) or (isinstance(option, str) and SBATCH_SAFE.fullmatch(option))
        if not valid:
            raise GridError(where, at, f"expected true (a bare flag), an integer or {SBATCH_SAFE_EXPECTED}, got {option!r}")
        options.append((name, option))
    return tuple(options)


def is_hostlist(text: str) -> bool:
    """SLURM's hostlist syntax, with every bracketed range ascending (gpu[07-04] is refused)."""
    if not SLURM_HOSTLIST.fullmatch(text):
        return False
    ranges = re.findall(r"(\d+)-(\d+)", "".join(re.findall(r"\[[^]]*\]", text)))
    return all(int(low) <= int(high) for low, high in ranges)


def with_nodes(resources: Resources, exclude: str | None, nodelist: str | None, flags: tuple[str, str]) -> Resources:
    """Every stage's resources with the command line's hosts to avoid or to use in place of the
    profile's (the `flags` they came from name them in errors)."""
    changes: dict[str, str] = {}
    for key, value, flag in (("exclude", exclude, flags[0]), ("nodelist", nodelist, flags[1])):
        if value is not None:
            if not is_hostlist(value):
                raise UsageError(f"{flag}: expected {HOSTLIST_EXPECTED}, got {value!r}")
            changes[key] = value
    return {stage: replace(r, **changes) for stage, r in resources.items()}


def _one_line(text: str) -> bool:
    return not any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text)


def _check(value: Any, kind: type, where: str, key_path: str, expected: str) -> None:
    if not isinstance(value, kind):
        raise GridError(where, key_path, f"expected {expected}, got {value!r}")
