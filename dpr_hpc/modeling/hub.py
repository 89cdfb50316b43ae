"""The one owner of the Hugging Face cache: hub models checked before anything is queued,
fetched into the cache on the login node, and pinned to the commit the cache holds.

Compute nodes often cannot reach the hub, and a model the first job would download fails
hours after submit. So `prefetch` (or `submit`, for a model the cache lacks) downloads every
hub model on the machine that submits, and every stage job runs offline (job_environment)
against the same cache, loading the exact commit its stage key was made with.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Iterable

from huggingface_hub import try_to_load_from_cache

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# How long `submit` waits for the hub before calling a model unreachable.
REACH_TIMEOUT_S = 10.0
# The files of a model repository a stage reads: configs, vocabularies, sentencepiece models
# (weights are picked apart, one format only; TF, Flax, ONNX and Rust files are never read).
TEXT_SUFFIXES = (".json", ".txt", ".model")


class HubUnreachableError(Exception):
    """A hub model that cannot be fetched from here; the message says why."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"{model}: {reason}")


def hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_VARIABLES)


def hub_cache_dir() -> Path:
    """Where the hub cache is now (read at each call: huggingface_hub reads it once at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def is_cached(model: str) -> bool:
    """Whether the model's config.json is in the local cache (any valid checkout has one)."""
    try:
        found = try_to_load_from_cache(model, "config.json", cache_dir=hub_cache_dir())
    except ValueError:  # not a valid repository id, so never in the cache
        return False
    return isinstance(found, str)


def uncached(models: Iterable[str]) -> list[str]:
    return sorted({m for m in models if not is_cached(m)})


def checkpoint_here(name_or_path: str) -> bool:
    """A local model folder, or a hub model whose config is in the local cache: something that
    `plan` and `submit` can load and check before the queue wait."""
    return Path(name_or_path).is_dir() or is_cached(name_or_path)


def cached_revision(model: str, revision: str = "main") -> str | None:
    """The commit the local cache holds for `model` (its refs/<revision> file): what a stage
    key names the model by, and what its jobs load."""
    ref = hub_cache_dir() / f"models--{model.replace('/', '--')}" / "refs" / revision
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def hub_endpoint() -> str | None:
    """HF_ENDPOINT as it is now (a mirror, or none for huggingface.co)."""
    return os.environ.get("HF_ENDPOINT") or None


def fetch(model: str, timeout_s: float = REACH_TIMEOUT_S) -> str:
    """Download `model`'s configs, tokenizer files and PyTorch weights at the hub's current
    main into the cache (refs/main then names that commit); returns the commit. Raises
    HubUnreachableError when the hub is offline, cannot be reached or does not have it."""
    if hub_offline():
        raise HubUnreachableError(model, "the hub is offline here (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)")
    from huggingface_hub import HfApi, snapshot_download

    try:
        listed = [s.rfilename for s in HfApi(endpoint=hub_endpoint()).model_info(model, timeout=timeout_s).siblings or []]
        snapshot = snapshot_download(model, revision="main", cache_dir=hub_cache_dir(), allow_patterns=files_to_fetch(listed),
                                     etag_timeout=timeout_s, endpoint=hub_endpoint())
    except Exception as error:  # noqa: BLE001 (the hub client raises its HTTP library's errors and its own; each is the reason given)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HubUnreachableError(model, f"not fetched from the hub ({type(error).__name__}: {reason})") from None
    return Path(snapshot).name


def files_to_fetch(listed: Iterable[str]) -> list[str]:
    """A repository's top-level configs and tokenizer files, and its weights in one format:
    safetensors where it has them, else PyTorch's .bin (sharded or not)."""
    top = [name for name in listed if "/" not in name]
    weights = [n for n in top if n.endswith(".safetensors")] or [n for n in top if n.startswith("pytorch_model") and n.endswith(".bin")]
    return sorted({n for n in top if n.endswith(TEXT_SUFFIXES)} | set(weights))


def job_environment() -> dict[str, str]:
    """The variables every stage job runs with: the hub offline, and this machine's cache,
    where prefetch put the models (SLURM passes the submitter's other variables on)."""
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache_dir().resolve())}


def job_environment_lines() -> list[str]:
    """job_environment as the shell lines a job's script runs before the stage."""
    return [f"export {name}={shlex.quote(value)}" for name, value in job_environment().items()]
