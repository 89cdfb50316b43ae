"""Content hashes of the inputs a stage reads: data files, local model folders, hub models.

A stage's key and its record's provenance name inputs by content, never by path, so an edited
dev file (or a retrained local model folder) is noticed even though its path is the same. A
hash is remembered by (path, size, modification time, inode, change time) in one memo file
under the runs root, so a multi-GB training file is read for hashing once, and hashed again
only when it changes. Size and mtime alone are not enough: where mtimes have a resolution of
a second (ext3, some NFS servers), a same-size rewrite within that second keeps both, and
`cp -p`, `rsync -a` or `mv` of another file set mtime to anything. The inode and ctime change
with any of those; and a file changed in the last RECENT_NS is hashed but never remembered,
since a second write within the same timestamp tick would go unseen.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

from dpr_hpc.fsutil import read_json, resolved, write_json_atomic

HASH_CHUNK = 1 << 22
# A file changed (mtime or ctime) less than this long ago is not remembered: a coarse timestamp
# (a second, on some file systems) could hide a second write within the same tick.
RECENT_NS = 2_000_000_000


class ContentHashes:
    """SHA-256 of files and folders, memoised in `memo_file` (None: nothing remembered)."""

    def __init__(self, memo_file: Path | None, hub_pins: Mapping[str, str] | None = None) -> None:
        self.memo_file = memo_file
        self.hub_pins = dict(hub_pins or {})  # hub model -> the commit its runs root pinned
        self._memo: dict[str, str] | None = None
        self._dirty = False
        self._asked: dict[Any, Any] = {}  # answers given to this command: one stat per file

    def once(self, question: Any, answer: Callable[[], Any]) -> Any:
        """`answer()`, asked once per instance: a plan of 2,000 cells names one data file 2,000 times."""
        if question not in self._asked:
            self._asked[question] = answer()
        return self._asked[question]

    def file(self, path: Path) -> str:
        return self.once(("file", str(path)), lambda: self._file(path))

    def _file(self, path: Path) -> str:
        return self._remembered(path, path.stat(), lambda: sha256_file(path))

    def opened(self, path: Path, handle: BinaryIO) -> str:
        """The hash of the file open as `handle` (read from it, then rewound), remembered by
        its own inode's stat: a file moved over `path` meanwhile is not the one hashed or parsed."""
        return self._remembered(path, os.fstat(handle.fileno()), lambda: sha256_handle(handle))

    def _remembered(self, path: Path, stat: os.stat_result, digest: Callable[[], str]) -> str:
        stamp = f"{resolved(path)}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"
        memo = self._load()
        if stamp in memo:
            return memo[stamp]
        value = digest()
        if settled(stat):
            memo[stamp] = value
            self._dirty = True
            self.save()
        return value

    def folder(self, path: Path) -> str:
        """One hash over every file's relative name and content: a model folder's identity.
        A folder that is gone raises FileNotFoundError; any other read error raises too, so a
        folder is never hashed from the part of it that could be read."""
        digest = hashlib.sha256()
        for relative, file in files_under(path):
            digest.update(f"{relative}\0{self.file(file)}\n".encode())
        return digest.hexdigest()

    def save(self) -> None:
        """Merge what this process learnt into the memo file (another job may have added to it)."""
        if self.memo_file is None or not self._dirty or self._memo is None:
            return
        try:
            on_disk = read_json(self.memo_file) if self.memo_file.is_file() else {}
        except (OSError, ValueError):
            on_disk = {}
        write_json_atomic(self.memo_file, {**on_disk, **self._memo})
        self._dirty = False

    def _load(self) -> dict[str, str]:
        if self._memo is None:
            self._memo = {}
            if self.memo_file is not None and self.memo_file.is_file():
                try:
                    self._memo = dict(read_json(self.memo_file))
                except (OSError, ValueError):
                    self._memo = {}  # a damaged memo only costs a re-hash
        return self._memo


def model_identity(name: str, local_path: str | None, hashes: ContentHashes) -> dict[str, Any]:
    """A local folder by its content; a hub model by name and its pinned commit, else the one
    the local Hugging Face cache resolves it to (None when it is not cached here)."""
    if local_path is not None:
        folder = Path(local_path)
        return hashes.once(("folder", local_path), lambda: {"folder_sha256": hashes.folder(folder) if folder.is_dir() else f"missing:{folder}"})
    from dpr_hpc.inputs.hub import revision_for

    return hashes.once(("hub", name), lambda: {"hub": name, "revision": revision_for(name, hashes.hub_pins)})


def settled(stat: os.stat_result) -> bool:
    """Unchanged for RECENT_NS (a time in the future, from another host's clock, is not)."""
    return time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) >= RECENT_NS


def files_under(root: Path) -> list[tuple[str, Path]]:
    """Every file below `root` but those whose own name starts with a dot, as (relative POSIX
    name, path) in the order of their relative parts: the listing `rglob("*")` gives, without
    its habit of skipping a folder it may not read (the digest of what was left would read as
    changed content, and rerun finished work). Symlinked folders are not entered."""
    found: list[tuple[tuple[str, ...], Path]] = []

    def walk(folder: Path, parts: tuple[str, ...]) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                here = (*parts, entry.name)
                if entry.is_dir() and not entry.is_symlink():
                    walk(Path(entry.path), here)
                elif entry.is_file() and not entry.name.startswith("."):
                    found.append((here, Path(entry.path)))

    walk(Path(root), ())
    return [("/".join(parts), path) for parts, path in sorted(found)]


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return sha256_handle(handle)


def sha256_handle(handle: BinaryIO) -> str:
    """The hash of everything in an open file, read from its start; left rewound to it."""
    digest = hashlib.sha256()
    handle.seek(0)
    while chunk := handle.read(HASH_CHUNK):
        digest.update(chunk)
    handle.seek(0)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
