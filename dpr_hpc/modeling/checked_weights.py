"""`plan` and `submit` load every encoder checkpoint of a grid that is here, as its stage will, so
that a weight that does not load stops the grid before the queue wait, not in the stage job.

That load imports torch and transformers (seconds), so a checkpoint that loaded is remembered by
its content: a local folder by the hash of its files (dpr_hpc.inputs.content), a hub model by the
commit the cache holds. The check then runs once per model and library version, not once per
command. Only a check that passed is remembered: a broken checkpoint is reported every time, and
an edited folder has another hash, so it is checked again.

The memo is one JSON file per user, `$DPR_HPC_CACHE/checked-checkpoints.json` (default
`$XDG_CACHE_HOME/dpr-hpc`, i.e. `~/.cache/dpr-hpc`), beside the content-hash memo of the folders'
files; both are written atomically and merged with what another command wrote meanwhile. A memo
that cannot be read or written only costs a check.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from dpr_hpc.errors import GridError
from dpr_hpc.fsutil import read_json, write_json_atomic, user_cache_dir
from dpr_hpc.inputs.content import ContentHashes
from dpr_hpc.inputs.hub import cached_revision, checkpoint_here
from dpr_hpc.provenance import now_iso

CACHE_ENV = "DPR_HPC_CACHE"
# Raised when what the check asks of a checkpoint changes, so older passes are not trusted.
CHECK_VERSION = 1


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return user_cache_dir()


class CheckedCheckpoints:
    """Which checkpoint contents loaded whole, under which torch and transformers."""

    def __init__(self, folder: Path | None = None) -> None:
        folder = folder or cache_dir()
        self.file = folder / "checked-checkpoints.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.hashes = ContentHashes(folder / "content-hashes.json")
        except OSError:
            self.hashes = ContentHashes(None)  # nowhere to remember file hashes: each folder is read again
        self._libraries = "|".join(f"{name} {_version(name)}" for name in ("torch", "transformers"))

    def key(self, path: str) -> str | None:
        """The checkpoint's content and the libraries that load it; None when it has none here."""
        if Path(path).is_dir():
            content = f"folder {self.hashes.folder(Path(path))}"
        else:
            commit = cached_revision(path)
            if commit is None:
                return None
            content = f"hub {path}@{commit}"
        return f"v{CHECK_VERSION}|{content}|{self._libraries}"

    def passed(self, key: str | None) -> bool:
        return key is not None and key in self._read()

    def remember(self, key: str | None, path: str) -> None:
        if key is None:
            return
        try:
            write_json_atomic(self.file, {**self._read(), key: {"path": path, "checked_at": now_iso()}})
        except OSError:
            pass  # a read-only or full cache folder: the check runs again next time, nothing worse

    def _read(self) -> dict[str, Any]:
        try:
            found = read_json(self.file)
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}


def check_grid_checkpoints(grid, before_loading: Callable[[], None] = lambda: None, memo: CheckedCheckpoints | None = None) -> None:
    """Raise GridError for the first encoder checkpoint of `grid` here whose weights do not all
    load; those that loaded before (by content) are not loaded again. `before_loading` runs once,
    before the first load (it quiets the libraries' progress bars)."""
    here: dict[str, tuple[str, str]] = {}  # each checkpoint once, with the first place that names it
    for cell in grid.cells:
        for key in ("question_encoder", "passage_encoder"):
            path = cell.model_path(getattr(cell, key))
            if path not in here and checkpoint_here(path):  # absent local folders are listed as missing data
                here[path] = (cell.group, key)
    if not here:
        return  # nothing to load: plan stays free of torch's import time
    memo = memo or CheckedCheckpoints()
    keys = {path: memo.key(path) for path in here}
    unchecked = {path: where for path, where in here.items() if not memo.passed(keys[path])}
    if not unchecked:
        return
    from dpr_hpc.modeling.encoder import check_checkpoint
    from dpr_hpc.errors import CheckpointError

    before_loading()
    for path, (group, key) in unchecked.items():
        try:
            check_checkpoint(path)
        except CheckpointError as error:
            raise GridError(str(grid.path), f"block {group}, {key}", f"expected a checkpoint whose every weight loads; {error}") from None
        memo.remember(keys[path], path)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"
