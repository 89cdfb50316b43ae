"""Node tags: where, on what and with which code a figure was measured, so hardware variance
stays visible and a figure can be traced to the code that made it.

The paper traced several anomalous timings to differing cluster nodes (section 5); every result
record therefore carries the host, the SLURM identity of its job and the device it ran on. The
package version alone does not tell two checkouts apart, so the record also carries a digest
of the package's source and, from a git checkout, its commit and whether it had local edits.
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

SLURM_VARIABLES = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_node": "SLURMD_NODENAME",
    "slurm_restart_count": "SLURM_RESTART_COUNT",
    "slurm_partition": "SLURM_JOB_PARTITION",
    "slurm_cpus_per_task": "SLURM_CPUS_PER_TASK",
}
LIBRARIES = ("dpr-hpc", "torch", "transformers", "faiss-cpu", "submitit", "numpy")


def node_tags() -> dict[str, Any]:
    """Host, SLURM identity (where present), device and library versions of this process."""
    tags: dict[str, Any] = {"hostname": socket.gethostname()}
    tags.update({key: os.environ[var] for key, var in SLURM_VARIABLES.items() if var in os.environ})
    tags.update(device_tags())
    tags["python"] = platform.python_version()
    tags["libraries"] = {name: _version(name) for name in LIBRARIES}
    tags["code"] = code_tags()
    return tags


@lru_cache(maxsize=1)
def code_tags() -> dict[str, Any]:
    """The code this process runs: a digest of the package's .py files (any install), and where
    the package is a tracked part of a git checkout, its commit and whether its files differ from
    it. Read once per process, at the start of a stage (an edit made while it runs is not its code)."""
    package = Path(__file__).resolve().parent
    return {"source_sha256": source_digest(package), **_git_state(package)}


def source_digest(folder: Path) -> str:
    """One SHA-256 over every .py file's path (relative to `folder`) and content."""
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*.py")):
        digest.update(f"{file.relative_to(folder).as_posix()}\0".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _git_state(package: Path) -> dict[str, Any]:
    """{git_commit, git_dirty} when the package's files are tracked in a git checkout (an
    installed copy that merely lies inside some repository is not), else {}."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".").strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


def code_label(tags: dict[str, Any]) -> str | None:
    """The short name a table shows for a record's code: the commit (with `+edits` when the
    checkout differed from it), else `src:` and the source digest; None for records from before."""
    code = tags.get("code") or {}
    if code.get("git_commit"):
        return code["git_commit"][:8] + ("+edits" if code.get("git_dirty") else "")
    return f"src:{code['source_sha256'][:8]}" if code.get("source_sha256") else None


def node_name() -> str:
    """This process's node as node_label shows it: SLURM's node name, else the host."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def node_label(tags: dict[str, Any]) -> str:
    """The short name a table shows: SLURM's node name where there is one, else the host."""
    return str(tags.get("slurm_node") or tags.get("hostname", "?"))


def device_tags() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "device": "cuda",
            "gpu_name": props.name,
            "gpu_uuid": str(getattr(props, "uuid", "")),
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        }
    return {"device": "cpu", "cpu_model": _cpu_model(), "cpu_count": os.cpu_count()}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
