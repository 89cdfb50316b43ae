"""The one owner of the Hugging Face cache: hub models checked before anything is queued,
fetched into the cache on the login node, and pinned to one commit per runs root.

Compute nodes often cannot reach the hub, and a model the first job would download fails
hours after submit. So `prefetch` (or `submit`, for a model the cache lacks) downloads every
hub model on the machine that submits, and every stage job runs offline (job_environment)
against the same cache, loading the exact commit its stage key was made with.

A stage key names a hub model by its commit, and the Hugging Face cache is shared by every
grid of the user: a download for one grid moves the cache's refs/main for all of them. So the
commit a runs root uses is pinned in its store (HubPins), the first time a model is used there,
and only `prefetch --update` moves a pin; otherwise a new commit on the hub would silently give
every stage of that model a new key and rerun days of training.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from dpr_hpc.errors import HubUnreachableError, UsageError
from dpr_hpc.fsutil import read_json, resolved, write_json_atomic
from dpr_hpc.locks import LockFile
from dpr_hpc.provenance import now_iso

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# How long `submit` waits for the hub before calling a model unreachable.
REACH_TIMEOUT_S = 10.0
# The files of a model repository a stage reads: configs, vocabularies, sentencepiece models
# (weights are picked apart, one format only; TF, Flax, ONNX and Rust files are never read).
TEXT_SUFFIXES = (".json", ".txt", ".model")


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
    from huggingface_hub import try_to_load_from_cache

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


def _repository(model: str) -> Path:
    return hub_cache_dir() / f"models--{model.replace('/', '--')}"


def cached_revision(model: str, revision: str = "main") -> str | None:
    """The commit the local cache's refs/<revision> names for `model` (None: not cached)."""
    try:
        return (_repository(model) / "refs" / revision).read_text().strip() or None
    except OSError:
        return None


def has_snapshot(model: str, commit: str) -> bool:
    """Whether the cache holds `model` at `commit` (its config.json, as every checkout has)."""
    return (_repository(model) / "snapshots" / commit / "config.json").is_file()


def revision_for(model: str, pins: Mapping[str, str]) -> str | None:
    """The commit a stage key names `model` by and its jobs load: the runs root's pin, else
    (before the first submit pins it) the cache's main."""
    return pins.get(model) or cached_revision(model)


class HubPins:
    """The commit of each hub model for every grid under one runs root (store/hub-pins.json):
    written by submit (a model's first use) and prefetch, read by every plan."""

    LOCK_TIMEOUT_S = 60.0

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, str]:
        if not self.path.is_file():
            return {}
        try:
            models = read_json(self.path)["models"]
            if not isinstance(models, dict) or not all(isinstance(c, str) for c in models.values()):
                raise ValueError("'models' is not a mapping of model to commit")
            return dict(models)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{self.path}: damaged ({type(exc).__name__}: {exc}); delete it to pin each hub model "
                             "at the commit the cache holds now (stage keys may change)") from None

    def update(self, pins: Mapping[str, str]) -> None:
        """Merge `pins` in, under a lock: two grids may submit at once."""
        if not pins:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with LockFile(self.path.with_suffix(".lock"), purpose="hub pins", timeout_s=self.LOCK_TIMEOUT_S):
            write_json_atomic(self.path, {"models": {**self.read(), **pins}, "updated_at": now_iso()})


def sync_pins(models: Sequence[str], pins_file: HubPins, update: bool, echo: Callable[[str], None]) -> None:
    """Each of `models` in the cache at the commit `pins_file` pins, fetched where the cache
    lacks it, and pinned at its first use; with `update` (prefetch --update), fetched at the
    hub's main now and its pin moved. Raises HubUnreachableError, naming the pin, for a model
    neither cached nor reachable; the pins are then left as they were."""
    pins = pins_file.read()
    new_pins: dict[str, str] = {}
    for model in models:
        pinned = pins.get(model)
        current = revision_for(model, pins)  # the commit this runs root uses (unpinned: the cache's main)
        present = current is not None and has_snapshot(model, current)
        if present and not update:
            new_pins.update({} if pinned else {model: current})
            continue
        try:
            revision = fetch(model, revision=pinned if pinned and not update else "main")
        except HubUnreachableError as error:
            if not present:
                raise HubUnreachableError(model, error.reason, pinned) from None
            echo(f"{model}: kept commit {current}; {error.reason}")  # --update with the hub out of reach
            new_pins.update({} if pinned else {model: current})
            continue
        echo(f"{model}: fetched commit {revision} into {hub_cache_dir()}")
        if pinned and revision != pinned:
            echo(f"{model}: pin moved from {pinned} to {revision}: the stage jobs of every cell using it (in every grid that "
                 f"{pins_file.path} pins) get new keys and run again at their next submit; the earlier results stay in the store")
        new_pins[model] = revision
    pins_file.update(new_pins)


def hub_endpoint() -> str | None:
    """HF_ENDPOINT as it is now (a mirror, or none for huggingface.co)."""
    return os.environ.get("HF_ENDPOINT") or None


def fetch(model: str, revision: str = "main", timeout_s: float = REACH_TIMEOUT_S) -> str:
    """Download `model`'s configs, tokenizer files and PyTorch weights at `revision` (the hub's
    current main, or a pinned commit) into the cache; returns the commit. Raises
    HubUnreachableError when the hub is offline, cannot be reached or does not have it."""
    if hub_offline():
        raise HubUnreachableError(model, "the hub is offline here (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)")
    from huggingface_hub import HfApi, snapshot_download

    try:
        listed = [s.rfilename for s in HfApi(endpoint=hub_endpoint()).model_info(model, revision=revision, timeout=timeout_s).siblings or []]
        snapshot = snapshot_download(model, revision=revision, cache_dir=hub_cache_dir(), allow_patterns=files_to_fetch(listed),
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
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(resolved(hub_cache_dir()))}


def job_environment_lines() -> list[str]:
    """job_environment as the shell lines a job's script runs before the stage."""
    return [f"export {name}={shlex.quote(value)}" for name, value in job_environment().items()]
