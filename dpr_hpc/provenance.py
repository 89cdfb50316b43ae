"""Node tags: where and on what a figure was measured, so hardware variance stays visible.

The paper traced several anomalous timings to differing cluster nodes (section 5); every result
record therefore carries the host, the SLURM identity of its job and the device it ran on.
"""

from __future__ import annotations

import os
import platform
import socket
from datetime import datetime, timezone
from importlib import metadata
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
    return tags


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
