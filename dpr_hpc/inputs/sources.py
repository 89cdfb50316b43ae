"""The one owner of the data folder: named sources (dpr_hpc.grid.sources) downloaded on the
login node, verified before any stage reads them, and pinned by content at first download.

DPR's files are GBs behind one HTTP server (psgs_w100.tsv.gz is 4.7 GB), so a download that
breaks resumes where it stopped: the bytes go into `<file>.part`, and the next prefetch asks
for the rest with an HTTP Range request. A complete download is checked against the digest
published for it (where one is) or the one pinned at its first download (data pins.json:
size and SHA-256, as hub models are pinned to a commit), and only then decompressed and put
where the grid's name points. A refused file is deleted, never left in place as if good.

Afterwards the data is offline: a source whose file matches its pin is never asked for again.
The pin also records the file's (size, mtime, inode) when it was last verified, so checking a
13 GB file costs one stat; any change to it is hashed again before use.

Why not ir_datasets: it serves the same bytes (its downloads.json points at DPR's URLs) but
not the same records. Its dpr-w100 NQ subsets are queries plus TREC qrels built from the
biencoder file, with the passages' titles and texts dropped and their ids de-duplicated
across positives, hard negatives and negatives; the stages need the records themselves, in
their order (the first hard negative is what the paper trains with).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from dpr_hpc.errors import DprHpcError
from dpr_hpc.fsutil import read_json, write_json_atomic
from dpr_hpc.grid.sources import Source, SourceError, base_url, data_dir, is_name, local_path, source
from dpr_hpc.inputs.content import settled
from dpr_hpc.locks import LockFile
from dpr_hpc.provenance import now_iso

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30.0  # per connection attempt and per read: a stalled server is an error, not a hang
PROGRESS_EVERY_S = 10.0


class DataSourceError(DprHpcError):
    """A named source that cannot be had, or was refused; the message names it and why."""

    exit_code = 2


@dataclass(frozen=True)
class Pin:
    """What a source was when first downloaded here: the download's size and SHA-256 (and the
    URL it came from), the plain file's, and the plain file's stat when last verified."""

    url: str
    download_size: int
    download_sha256: str
    size: int
    sha256: str
    verified_stat: str = ""
    fetched_at: str = ""


class DataPins:
    """<data dir>/pins.json: one pin per source, shared by every grid and runs root that uses
    this data folder (the folder holds one copy of each source)."""

    LOCK_TIMEOUT_S = 60.0

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "pins.json"

    def read(self) -> dict[str, Pin]:
        if not self.path.is_file():
            return {}
        try:
            return {name: Pin(**fields) for name, fields in read_json(self.path)["sources"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataSourceError(f"{self.path}: damaged ({type(exc).__name__}: {exc}); delete it to pin each source "
                                  "again at its next download") from None

    def update(self, name: str, pin: Pin) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with LockFile(self.path.with_suffix(".lock"), purpose="data pins", timeout_s=self.LOCK_TIMEOUT_S):
            pins = {n: p.__dict__ for n, p in self.read().items()}
            write_json_atomic(self.path, {"sources": {**pins, name: pin.__dict__}, "updated_at": now_iso()})


def resolve(value: str, base_dir: Path | None = None) -> Path:
    """The local file a grid value stands for: a named source's verified file, or a path as
    written (relative ones from `base_dir`, the grid's folder). Raises DataSourceError for a
    name that is unknown, not downloaded here, or changed since it was verified."""
    if not is_name(value):
        return ((base_dir or Path.cwd()) / Path(value).expanduser()).resolve()
    path = _local(value)
    pin = DataPins(data_dir()).read().get(value)
    if pin is None or not path.is_file():
        raise DataSourceError(f"{value}: not downloaded here (expected {path}); run 'dpr-hpc prefetch GRID' on a machine "
                              f"that reaches {base_url()}")
    problem = _mismatch(value, path, pin)
    if problem:
        raise DataSourceError(f"{value}: {problem}; run 'dpr-hpc prefetch GRID' to download it again")
    return path


def fetch(name: str, echo: Callable[[str], None] = print) -> Path:
    """`name`'s file in the data folder, verified: kept as it is when it matches its pin (no
    request at all), else downloaded (resuming a `.part` left by an earlier try), checked,
    decompressed and pinned."""
    found = _source(name)
    target = _local(name)
    pins = DataPins(data_dir())
    target.parent.mkdir(parents=True, exist_ok=True)
    with LockFile(target.with_name(f".{target.name}.lock"), purpose=f"downloading {name}", timeout_s=0.0):
        pin = pins.read().get(name)
        if pin is not None and target.is_file():
            problem = _mismatch(name, target, pin)
            if not problem:
                return target
            echo(f"{name}: {problem}; downloading it again")
            target.unlink()
        url = found.url_from(base_url())
        part = target.with_name(found.download_name + ".part")
        _download(name, url, part, echo)
        download = _digest(part, md5=found.md5 is not None and pin is None)
        _check_download(name, found, url, part, download, pin)
        digest = _install(part, target, download, found.gzipped)
        if pin is not None and digest.sha256 != pin.sha256:
            target.unlink()
            raise DataSourceError(f"{name}: {target.name} decompressed to sha256 {digest.sha256}, but {pins.path} pins "
                                  f"{pin.sha256}; refused and deleted")
        pins.update(name, Pin(url, download.size, download.sha256, digest.size, digest.sha256, _stat(target),
                              pin.fetched_at if pin else now_iso()))
        part.unlink(missing_ok=True)
        echo(f"{name}: fetched {url} -> {target} ({_size(digest.size)}, sha256 {digest.sha256[:16]}…, "
             f"{'matching its listed md5, and ' if found.md5 and pin is None else 'matching its pin; ' if pin else ''}"
             f"pinned in {pins.path})")
        return target


def fetch_all(values: Iterable[str], echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Every named source among `values` (paths are left alone), in order, each once."""
    names = list(dict.fromkeys(v for v in values if is_name(v)))
    return {name: fetch(name, echo) for name in names}


def verify_all(values: Iterable[str]) -> dict[str, Path]:
    """`resolve` for every named source among `values`: what submit checks before it plans."""
    return {v: resolve(v) for v in dict.fromkeys(values) if is_name(v)}


def grid_values(grid: object) -> list[str]:
    """Every data value a grid's cells name: data.train and data.dev, and a corpus's passages
    and questions where a cell has one."""
    values: list[str] = []
    for cell in getattr(grid, "cells", ()):
        values += [v for v in (cell.data.train, cell.data.dev) if v]
        corpus = getattr(cell, "corpus", None)
        values += [v for v in (getattr(corpus, "passages", None), getattr(corpus, "questions", None)) if isinstance(v, str)]
    return list(dict.fromkeys(values))


def _source(name: str) -> Source:
    try:
        return source(name)
    except SourceError as error:
        raise DataSourceError(str(error)) from None


def _local(name: str) -> Path:
    try:
        return local_path(name)
    except SourceError as error:
        raise DataSourceError(str(error)) from None


def _download(name: str, url: str, part: Path, echo: Callable[[str], None]) -> None:
    """The whole of `url` in `part`, continuing from the bytes already there where the server
    allows (206); a server that ignores Range (200) sends it all again. A connection that breaks
    leaves `part` for the next try to resume."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have and _total_from(error.headers.get("Content-Range", "")) == have:
            return  # the .part already holds all of it (killed before it was checked)
        if error.code == 416:
            part.unlink()
            return _download(name, url, part, echo)
        raise DataSourceError(f"{name}: {url}: the server answered {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataSourceError(f"{name}: cannot reach {url} ({reason}); the {_size(have)} already fetched stay in {part} "
                              "for the next try to resume") from None
    with response:
        resumed = response.status == 206
        total = _total_from(response.headers.get("Content-Range", "")) if resumed else _int(response.headers.get("Content-Length"))
        if have and not resumed:
            echo(f"{name}: the server does not resume downloads; fetching {url} from the start")
        elif have:
            echo(f"{name}: resuming {url} at {_size(have)}")
        else:
            echo(f"{name}: fetching {url}" + (f" ({_size(total)})" if total else ""))
        written = have if resumed else 0
        last = time.monotonic()
        # Unbuffered, and each read takes what has arrived (read1): what is on disk is what the
        # next try resumes from, whenever this one is killed.
        with part.open("ab" if resumed else "wb", buffering=0) as handle:
            while chunk := _read(response, name, url, written):
                handle.write(chunk)  # a full disk is the file system's error, naming the .part
                written += len(chunk)
                if time.monotonic() - last > PROGRESS_EVERY_S:
                    last = time.monotonic()
                    echo(f"{name}: {_size(written)}" + (f" of {_size(total)}" if total else ""))
    if total is not None and written != total:
        raise DataSourceError(f"{name}: the download of {url} stopped at {_size(written)} of {_size(total)}; "
                              "run prefetch again to resume it")


def _read(response: object, name: str, url: str, written: int) -> bytes:
    try:
        return response.read1(CHUNK)  # type: ignore[attr-defined]
    except OSError as error:  # the connection broke or stalled past TIMEOUT_S
        raise DataSourceError(f"{name}: the download of {url} broke off at {_size(written)} ({error}); "
                              "run prefetch again to resume it") from None


@dataclass(frozen=True)
class _Digest:
    size: int
    sha256: str
    md5: str | None = None


def _digest(path: Path, md5: bool = False) -> _Digest:
    sha, check = hashlib.sha256(), hashlib.md5() if md5 else None
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK * 4):
            sha.update(chunk)
            if check is not None:
                check.update(chunk)
    return _Digest(path.stat().st_size, sha.hexdigest(), check.hexdigest() if check else None)


def _check_download(name: str, found: Source, url: str, part: Path, got: _Digest, pin: Pin | None) -> None:
    """Refuse (delete) a download that is not the file pinned, or not the one published."""
    if pin is not None and (got.sha256, got.size) != (pin.download_sha256, pin.download_size):
        part.unlink()
        raise DataSourceError(f"{name}: {found.download_name} from {url} has sha256 {got.sha256} ({got.size} bytes), but "
                              f"{DataPins(data_dir()).path} pins sha256 {pin.download_sha256} ({pin.download_size} bytes); "
                              "refused and deleted")
    if pin is None and found.md5 and got.md5 != found.md5:
        part.unlink()
        raise DataSourceError(f"{name}: {found.download_name} from {url} has md5 {got.md5}, but the published md5 is "
                              f"{found.md5}; refused and deleted")


def _install(part: Path, target: Path, download: _Digest, gunzip: bool) -> _Digest:
    """The verified download as the stages' plain file: moved there, or decompressed under a
    temporary name first (a kill meanwhile leaves the .part to decompress again)."""
    if not gunzip:
        os.replace(part, target)
        return download
    staging = target.with_name(f".{target.name}.unpacking")
    try:
        with gzip.open(part, "rb") as source_file, staging.open("wb") as out:
            shutil.copyfileobj(source_file, out, CHUNK * 4)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        staging.unlink(missing_ok=True)
        part.unlink()
        raise DataSourceError(f"{part}: not a gzip file as its name says ({error}); refused and deleted") from None
    except BaseException:
        staging.unlink(missing_ok=True)  # a full disk, an interrupt: the verified .part stays for the next try
        raise
    os.replace(staging, target)
    return _digest(target)


def _mismatch(name: str, path: Path, pin: Pin) -> str | None:
    """Why the file is not the pinned one (None: it is). Unchanged since last verified: one
    stat; touched or copied but the same bytes: hashed once, and its new stat remembered, as the
    content-hash memo remembers (inputs.content: ctime too, and never a file changed within the
    last two seconds). A data folder the user cannot write (a shared read-only copy) is still
    verified; only the remembering is skipped."""
    stat = path.stat()
    if _stamp(stat) == pin.verified_stat:
        return None
    got = _digest(path)
    if (got.sha256, got.size) == (pin.sha256, pin.size):
        if settled(stat):
            try:
                DataPins(data_dir()).update(name, dataclasses.replace(pin, verified_stat=_stamp(stat)))
            except OSError as error:
                log.warning("%s: verified, but its stat could not be remembered in %s (%s)", path, DataPins(data_dir()).path, error)
        return None
    return f"{path} has sha256 {got.sha256} ({got.size} bytes), but its pin is sha256 {pin.sha256} ({pin.size} bytes)"


def _stamp(stat: os.stat_result) -> str:
    return f"{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"


def _stat(path: Path) -> str:
    return _stamp(path.stat())


def _total_from(content_range: str) -> int | None:
    """The full size in 'bytes 100-199/200' or 'bytes */200'."""
    return _int(content_range.rpartition("/")[2]) if "/" in content_range else None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _size(count: int | None) -> str:
    if count is None:
        return "?"
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return str(count)

