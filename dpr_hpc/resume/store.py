"""Checkpoint files that survive a kill -9 at any moment.

Each checkpoint is `step-<n>.pt` plus a sidecar `step-<n>.json` holding its SHA-256 and size.
The `.pt` is written to a temporary name, fsynced and renamed; the sidecar is written last, so
a checkpoint without one was never finished. Older checkpoints are deleted only after the new
one is complete, so a crash while writing loses at most the steps since the previous one.
Loading walks from the newest checkpoint down and skips, with a warning, any whose bytes do not
match their sidecar (truncated, corrupted, or unfinished).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dpr_hpc.fsutil import read_json, write_json_atomic
from dpr_hpc.provenance import now_iso

KEEP = 2  # the newest complete checkpoint and the one before it
_NAME = re.compile(r"step-(\d+)\.pt$")
# Fault injection for the crash tests: "kill-during-write:<n>" SIGKILLs this process halfway
# through writing its n-th checkpoint, as a node failure or an OOM killer would.
FAULT_ENV = "DPR_HPC_FAULT"


@dataclass(frozen=True)
class Loaded:
    state: dict[str, Any]
    path: Path
    step: int
    write_s: float  # how long writing it took: the file cannot hold its own write time


class CheckpointStore:
    def __init__(self, folder: Path, warn: Callable[[str], None] = print) -> None:
        self.folder = folder
        self.warn = warn
        self.saves = 0

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write, verify by checksum, then drop checkpoints older than the previous one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"step-{step:09d}.pt"
        tmp = self.folder / f".{final.name}.{os.getpid()}.tmp"
        self.saves += 1
        began = time.perf_counter()
        try:
            with tmp.open("wb") as handle:
                torch.save(state, handle)
                handle.flush()
                _maybe_die_midway(handle, self.saves)
                os.fsync(handle.fileno())
            digest, size = _sha256(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        sidecar = {"step": step, "sha256": digest, "bytes": size, "written_at": now_iso(), "write_s": time.perf_counter() - began}
        write_json_atomic(_sidecar(final), sidecar)
        _fsync_folder(self.folder)
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
        complete = [(p, s) for p, s in self._candidates() if _sidecar(p).exists()]
        for path, _ in complete[KEEP:]:
            path.unlink(missing_ok=True)
            _sidecar(path).unlink(missing_ok=True)
        for stale in self.folder.glob(".step-*.tmp"):  # left by a process killed while writing
            if not stale.name.endswith(f".{os.getpid()}.tmp"):
                stale.unlink(missing_ok=True)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _problem(path: Path) -> str | None:
    try:
        expected = read_json(_sidecar(path))
    except FileNotFoundError:
        return "no checksum file (the write never finished)"
    except (OSError, ValueError) as exc:
        return f"checksum file unreadable ({exc})"
    digest, size = _sha256(path)
    if size != expected.get("bytes"):
        return f"{size} bytes, expected {expected.get('bytes')} (truncated)"
    if digest != expected.get("sha256"):
        return "checksum mismatch (corrupted)"
    return None


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable too, not only the bytes."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _maybe_die_midway(handle, save_number: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault.startswith("kill-during-write:") and fault.split(":", 1)[1] == str(save_number):
        handle.truncate(max(1, handle.tell() // 2))
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
