"""Checkpoint files that survive a kill -9 at any moment.

Each checkpoint is `step-<n>.pt` plus a sidecar `step-<n>.json` holding its SHA-256 and size.
The `.pt` is written to a temporary name, fsynced and renamed; the sidecar is written last, so
a checkpoint without one was never finished. Older checkpoints are deleted only after the new
one is complete, so a crash while writing loses at most the steps since the previous one.
Loading walks from the newest checkpoint down and skips, with a warning, any whose bytes do not
match their sidecar (truncated, corrupted, or unfinished). A write that fails (a full disk)
removes what it wrote and raises, leaving the previous checkpoint as it was; the caller decides
whether that is fatal. Orphans (a `.pt` without its sidecar, or the reverse) are pruned.

Only one job writes a training's checkpoints, but a copy that lost its claim may not know it
yet (its heartbeat lapsed while it lived). So the store asks `before_write` (the runner's claim
check) before it writes and again before it renames and prunes, and its temporary files carry
a name of this store's own: pruning removes its own leftovers only, never a file another
writer is writing now. A killed writer's temporary file stays until the training's resume
folder is discarded with the rest, once its record is written.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dpr_hpc.fsutil import file_digest, read_json, write_json_atomic
from dpr_hpc.provenance import now_iso

KEEP = 2  # the newest complete checkpoint and the one before it
_NAME = re.compile(r"step-(\d+)\.pt$")
# Fault injection for the crash tests, halfway through writing the n-th checkpoint:
# "kill-during-write:<n>" SIGKILLs this process, as a node failure or an OOM killer would;
# "enospc-during-write:<n>" fails the write as a full disk would.
FAULT_ENV = "DPR_HPC_FAULT"


@dataclass(frozen=True)
class Loaded:
    state: dict[str, Any]
    path: Path
    step: int
    write_s: float  # how long writing it took: the file cannot hold its own write time


class CheckpointStore:
    def __init__(self, folder: Path, warn: Callable[[str], None] = print, before_write: Callable[[], None] | None = None) -> None:
        """`before_write` raises when this writer may no longer write here (its claim was lost)."""
        self.folder = folder
        self.warn = warn
        self.saves = 0
        self.before_write = before_write or (lambda: None)
        self._tmp_tag = uuid.uuid4().hex[:12]

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write, verify by checksum, then drop checkpoints older than the previous one."""
        self.before_write()
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"step-{step:09d}.pt"
        tmp = self.folder / f".{final.name}.{self._tmp_tag}.tmp"
        self.saves += 1
        began = time.perf_counter()
        renamed = False
        try:
            with tmp.open("wb") as handle:
                torch.save(state, handle)
                handle.flush()
                _maybe_fail_midway(handle, self.saves)
                os.fsync(handle.fileno())
            written = file_digest(tmp)
            self.before_write()  # the write took a while: still this writer's folder?
            os.replace(tmp, final)
            renamed = True
            sidecar = {"step": step, "sha256": written.sha256, "bytes": written.size, "written_at": now_iso(), "write_s": time.perf_counter() - began}
            write_json_atomic(_sidecar(final), sidecar)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if renamed and not _sidecar(final).exists():  # renamed, but its sidecar could not be written
                final.unlink(missing_ok=True)
            raise
        _fsync_folder(self.folder)
        self.before_write()
        self._prune()
        return final

    def load_latest(self, map_location: Any = "cpu") -> Loaded | None:
        """The newest checkpoint whose bytes match its checksum, or None when there is none."""
        for path, step in self._candidates():
            problem = _problem(path)
            if problem is None:
                try:
                    state = torch.load(path, map_location=map_location, weights_only=False)
                    return Loaded(state, path, step, float(read_json(_sidecar(path)).get("write_s", 0.0)))
                except Exception as exc:  # a file that matches its checksum but will not load
                    problem = f"unreadable ({type(exc).__name__}: {exc})"
            self.warn(f"warning: checkpoint {path} skipped: {problem}")
        return None

    def clear(self) -> None:
        """Remove every checkpoint (after the stage finished and saved its final outputs)."""
        if self.folder.is_dir():
            for file in self.folder.iterdir():
                file.unlink(missing_ok=True)
            self.folder.rmdir()

    def _candidates(self) -> list[tuple[Path, int]]:
        if not self.folder.is_dir():
            return []
        found = [(p, int(m.group(1))) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found, key=lambda item: item[1], reverse=True)

    def _prune(self) -> None:
        """Keep the KEEP newest complete checkpoints; drop orphans, which no load would use."""
        complete = [(p, s) for p, s in self._candidates() if _sidecar(p).exists()]
        for path, _ in complete[KEEP:]:
            path.unlink(missing_ok=True)
            _sidecar(path).unlink(missing_ok=True)
        for path, _ in self._candidates():
            if not _sidecar(path).exists():
                self.warn(f"warning: checkpoint {path.name} removed: no checksum file (its write never finished)")
                path.unlink(missing_ok=True)
        for sidecar in self.folder.glob("step-*.json"):
            if not sidecar.with_suffix(".pt").exists():
                sidecar.unlink(missing_ok=True)
        for own in self.folder.glob(f".step-*.{self._tmp_tag}.tmp"):  # another writer's are theirs
            own.unlink(missing_ok=True)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _problem(path: Path) -> str | None:
    try:
        expected = read_json(_sidecar(path))
    except FileNotFoundError:
        return "no checksum file (the write never finished)"
    except (OSError, ValueError) as exc:
        return f"checksum file unreadable ({exc})"
    actual = file_digest(path)
    if actual.size != expected.get("bytes"):
        return f"{actual.size} bytes, expected {expected.get('bytes')} (truncated)"
    if actual.sha256 != expected.get("sha256"):
        return "checksum mismatch (corrupted)"
    return None


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable too, not only the bytes."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _maybe_fail_midway(handle, save_number: int) -> None:
    kind, _, number = os.environ.get(FAULT_ENV, "").partition(":")
    if kind not in ("kill-during-write", "enospc-during-write") or number != str(save_number):
        return
    handle.truncate(max(1, handle.tell() // 2))
    handle.flush()
    if kind == "kill-during-write":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAULT_ENV})")
