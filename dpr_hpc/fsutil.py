"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Every write goes to a temporary name beside its target, is fsynced, then renamed over it, so
a job killed mid-write or a full disk leaves the previous version (or nothing), not a
truncated artifact that later passes for a complete one. Files and folders get the modes the
umask allows, as `open` would give them: a run folder shared by a group stays readable (and
writable) by the group. `tempfile` alone would create them 0600 and 0700 whatever the umask.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (os.umask can only
    be read by setting it, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> FileDigest:
    """`data` as the whole content of `path`; returns its size and SHA-256."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            handle.write(data)
    return _replace_with(path, write, FileDigest(len(data), hashlib.sha256(data).hexdigest()))


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> FileDigest:
    """`write(tmp)` writes the content to a temporary path (e.g. faiss.write_index, np.save);
    it becomes `path` once complete and on disk. The digest is read back from the written
    bytes, so it is the hash of what a later reader will get."""
    return _replace_with(path, write, None)


def _replace_with(path: Path, write: Callable[[Path], None], digest: FileDigest | None) -> FileDigest:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        write(tmp)
        _fsync_file(tmp)
        digest = digest or file_digest(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None and error.errno is not None:
            # A write or fsync that fails (ENOSPC, EDQUOT) names no file: name the one it was for.
            raise type(error)(error.errno, error.strerror, str(path)) from error
        raise
    _fsync_dir(path.parent)
    return digest


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Build a folder in a temporary folder beside `target`; when the block ends without an
    exception, every file in it is fsynced and it replaces `target` (an older `target` is
    moved aside first and deleted after). On an exception the temporary folder is deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(file)
        for folder in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
            _fsync_dir(folder)
        _fsync_dir(tmp)
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_digest(path: Path) -> FileDigest:
    """Size and SHA-256 of a file, read in 4 MB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return FileDigest(Path(path).stat().st_size, digest.hexdigest())


def read_json(path: Path) -> Any:
    with path.open() as handle:
        return json.load(handle)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Makes a rename durable; some filesystems refuse fsync on a folder, which then is moot."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_line(path: Path, line: str) -> None:
    """One line appended to a log and synced before returning, written whole or not at all.

    `os.write` may write part of the line (a full disk, a quota reached mid-write) and report
    it only by its return value, or raise after part of it landed: the rest is written in a
    loop, and on an error the file is cut back to its size before, so no half line stays for
    the next append to join onto. A line left cut by a crash (no newline at the end) gets one
    first, so the new line stays readable. The file gets the umask's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        before = os.fstat(fd).st_size
        if before and os.pread(fd, 1, before - 1) != b"\n":
            data = b"\n" + data
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, before)
            except OSError:
                pass  # the cut line stays: readers skip it, and the next append starts a new line
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # a regular file writes at least a byte or raises; never loop on 0
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def save_array(path: Path, array: Any) -> None:
    """A NumPy array in .npy format at exactly `path` (np.save given a path would add '.npy' to
    a temporary name); for `write_file_atomic`."""
    import numpy as np

    with Path(path).open("wb") as handle:
        np.save(handle, array)


def resolved(path: str | Path) -> Path:
    """`Path(path).resolve()`, worked out once per distinct path in a process: a grid of 2,000
    cells names the same model folder and data files in every cell, and each resolve walks
    every component with a system call. A relative path is keyed with the working directory
    it is resolved from."""
    text = os.fspath(path)
    return _resolved(text if os.path.isabs(text) else os.path.join(os.getcwd(), text))


@functools.lru_cache(maxsize=1 << 16)
def _resolved(absolute: str) -> Path:
    return Path(absolute).resolve()


def user_cache_dir() -> Path:
    """dpr-hpc's folder in the user's cache: $XDG_CACHE_HOME/dpr-hpc, or ~/.cache/dpr-hpc where
    that is unset or empty (an empty one would make the cache relative to the working directory)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dpr-hpc"
