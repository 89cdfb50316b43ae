"""The content-hash memo: a data file is hashed once while it stays the same, and again whenever
its bytes may have changed, even where a same-size rewrite keeps its size and mtime."""

from __future__ import annotations

import hashlib
import json
import os
import time
import types

import pytest

import dpr_hpc.inputs.content as content
from dpr_hpc.inputs.content import ContentHashes


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_keeping_mtime(path, data: bytes, mtime_ns: int) -> None:
    """A rewrite as a file system with 1-second mtimes sees it: same size, same mtime."""
    before = path.stat().st_ctime_ns if path.exists() else None
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    while path.stat().st_ctime_ns == before:  # ctime ticks with the kernel's clock: wait for the tick, not a time
        os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_same_size_rewrite_within_the_same_second_gets_a_new_hash(tmp_path):
    data, memo = tmp_path / "dev.json", tmp_path / "content-hashes.json"
    second = time.time_ns() // 10**9 * 10**9
    _write_keeping_mtime(data, b'["first"]', second)
    assert ContentHashes(memo).file(data) == _sha(b'["first"]')
    _write_keeping_mtime(data, b'["other"]', second)
    assert ContentHashes(memo).file(data) == _sha(b'["other"]')


def test_a_file_changed_in_the_last_two_seconds_is_hashed_but_not_remembered(tmp_path, monkeypatch):
    data, memo = tmp_path / "dev.json", tmp_path / "content-hashes.json"
    data.write_bytes(b'["x"]')
    assert ContentHashes(memo).file(data) == _sha(b'["x"]')
    assert not memo.exists()
    later = time.time_ns() + content.RECENT_NS
    monkeypatch.setattr(content, "time", types.SimpleNamespace(time_ns=lambda: later))
    assert ContentHashes(memo).file(data) == _sha(b'["x"]')
    assert list(json.loads(memo.read_text()).values()) == [_sha(b'["x"]')]


@pytest.fixture
def settled_at_once(monkeypatch):
    """Files count as settled as soon as written, so that the memo's key is what is tested."""
    monkeypatch.setattr(content, "RECENT_NS", 0, raising=False)


def test_a_remembered_hash_is_used_until_the_inode_or_ctime_changes(tmp_path, settled_at_once, monkeypatch):
    data, memo = tmp_path / "train.json", tmp_path / "content-hashes.json"
    mtime = time.time_ns() // 10**9 * 10**9
    _write_keeping_mtime(data, b'["aaaa"]', mtime)
    assert ContentHashes(memo).file(data) == _sha(b'["aaaa"]')
    read = []
    real = content.sha256_file
    monkeypatch.setattr(content, "sha256_file", lambda path: read.append(path) or real(path))
    assert ContentHashes(memo).file(data) == _sha(b'["aaaa"]') and read == []  # remembered: not read again

    _write_keeping_mtime(data, b'["bbbb"]', mtime)  # in place: same inode, size and mtime; a new ctime
    assert ContentHashes(memo).file(data) == _sha(b'["bbbb"]')
    other = tmp_path / "incoming.json"
    _write_keeping_mtime(other, b'["cccc"]', mtime)
    os.replace(other, data)  # moved over it: another inode, same size and mtime
    assert ContentHashes(memo).file(data) == _sha(b'["cccc"]')
