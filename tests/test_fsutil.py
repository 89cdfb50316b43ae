"""Atomic writes: modes follow the umask (a group-shared run folder works for the group), a
failed write leaves the old version, and digests are those of the bytes on disk."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from dpr_hpc.fsutil import append_line, atomic_folder, file_digest, write_bytes_atomic, write_file_atomic, write_json_atomic
from dpr_hpc.tracking.ledger import Ledger
from dpr_hpc.planning.plan import StageJob
from dpr_hpc.store.paths import StageStore
from dpr_hpc.locks import LockFile


@pytest.fixture
def group_umask():
    old = os.umask(0o002)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_folders_and_locks_respect_a_group_umask(tmp_path, group_umask):
    write_json_atomic(tmp_path / "record.json", {"a": 1})
    write_bytes_atomic(tmp_path / "ids.json", b"[]")
    write_file_atomic(tmp_path / "rankings.bin", lambda tmp: tmp.write_bytes(b"x"))
    with atomic_folder(tmp_path / "encoder") as folder:
        (folder / "weights.bin").write_bytes(b"w")
    with Ledger.locked(StageStore.at(tmp_path / "runs")) as ledger:
        ledger.record(StageJob("train", "k", 0), "1")
        assert _mode(tmp_path / "runs" / "store" / "ledger.lock") == 0o664
    for name in ("record.json", "ids.json", "rankings.bin", "runs/store/ledger.jsonl"):
        assert _mode(tmp_path / name) == 0o664, name
    assert _mode(tmp_path / "encoder") == 0o775


def test_a_private_umask_keeps_files_private(tmp_path):
    old = os.umask(0o077)
    try:
        write_json_atomic(tmp_path / "record.json", {"a": 1})
        with LockFile(tmp_path / "x.lock", purpose="test"):
            assert _mode(tmp_path / "x.lock") == 0o600
    finally:
        os.umask(old)
    assert _mode(tmp_path / "record.json") == 0o600


def test_digests_are_of_the_bytes_written(tmp_path):
    data = os.urandom(10_000)
    written = write_bytes_atomic(tmp_path / "a.bin", data)
    assert written == file_digest(tmp_path / "a.bin")
    assert (written.size, written.sha256) == (10_000, hashlib.sha256(data).hexdigest())
    assert write_file_atomic(tmp_path / "b.bin", lambda tmp: tmp.write_bytes(data)) == written


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "index.faiss"
    target.write_bytes(b"old")

    def fails(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_file_atomic(target, fails)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "passage_encoder"
    with atomic_folder(target) as folder:
        (folder / "config.json").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as folder:
            (folder / "config.json").write_text("v2-partial")
            raise RuntimeError("killed mid-save")
    assert (target / "config.json").read_text() == "v1"
    with atomic_folder(target) as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "config.json").write_text("v3")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["passage_encoder"]


def test_an_append_that_os_write_takes_in_pieces_lands_whole(tmp_path, monkeypatch):
    """os.write may write less than it was given (a signal, a nearly full disk) and say so only
    by its return value: the rest is written, not dropped."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:5])))
    log = tmp_path / "log.jsonl"
    append_line(log, '{"job": "train/abc/r0", "job_id": "101"}')
    append_line(log, '{"job": "index/def/r0", "job_id": "102"}')
    monkeypatch.setattr(os, "write", real_write)
    assert log.read_text() == '{"job": "train/abc/r0", "job_id": "101"}\n{"job": "index/def/r0", "job_id": "102"}\n'


def test_the_user_cache_is_never_relative_to_the_working_directory(monkeypatch, tmp_path):
    from pathlib import Path

    from dpr_hpc.fsutil import user_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # set but empty: as unset
    assert user_cache_dir() == tmp_path / ".cache" / "dpr-hpc"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == Path(tmp_path / "xdg" / "dpr-hpc")
