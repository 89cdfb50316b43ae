"""Exclusive-create lock files: mutual exclusion across processes, stale locks, holders named."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import held_elsewhere
from dpr_hpc.locks import LockFile
from dpr_hpc.errors import LockHeldError


def _stale_file(path: Path, **changes) -> dict:
    """A lock file as a holder elsewhere would have left it."""
    holder = {
        "host": "node17", "pid": 4242, "slurm_job_id": "991", "purpose": "submit",
        "created": time.time() - 7200, "heartbeat": time.time() - 3600, "token": "theirs",
    }
    holder.update(changes)
    path.write_text(json.dumps(holder))
    return holder


def test_lock_is_exclusive_and_records_its_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    path = tmp_path / "run.lock"
    with LockFile(path, purpose="ledger") as lock:
        holder = LockFile.read_holder(path)
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert holder["slurm_job_id"] == "777" and holder["purpose"] == "ledger"
        assert holder["created"] <= holder["heartbeat"]
        with pytest.raises(LockHeldError):
            LockFile(path, purpose="other").acquire()
        assert lock.held
    assert not path.exists()


def test_timeout_message_names_the_holder(tmp_path):
    path = tmp_path / "run.lock"
    with held_elsewhere(path), pytest.raises(LockHeldError) as caught:
        LockFile(path, purpose="submit").acquire(timeout_s=0.3, poll_s=0.05)
    message = str(caught.value)
    assert "\n" not in message
    for part in (str(path), "pid 4242", "node17", "SLURM job 991", "heartbeat 0s ago"):
        assert part in message
    assert caught.value.holder["token"] == "theirs"
    assert caught.value.exit_code == 1


def test_stale_heartbeat_is_broken(tmp_path):
    path = tmp_path / "run.lock"
    _stale_file(path)  # another host, heartbeat an hour old, and it no longer beats
    with LockFile(path, purpose="submit", stale_after_s=0.5):
        assert LockFile.read_holder(path)["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_holder_elsewhere_whose_clock_runs_ahead_is_broken_once_its_heartbeat_stops(tmp_path):
    """Its last heartbeat is stamped an hour in this host's future; read as a clock it would
    look alive for an hour. Unchanged for the stale period, watched on our own clock, it is dead."""
    path = tmp_path / "run.lock"
    _stale_file(path, heartbeat=time.time() + 3600, beat=7)
    began = time.monotonic()
    lock = LockFile(path, purpose="submit", stale_after_s=0.5).acquire(timeout_s=0, poll_s=0.02)
    assert time.monotonic() - began >= 0.5  # watched for the whole stale period first
    assert LockFile.read_holder(path)["token"] == lock._token
    lock.release()


def test_a_holder_elsewhere_whose_clock_runs_behind_is_not_broken_while_its_heartbeat_advances(tmp_path):
    """Its heartbeats are stamped an hour in this host's past, but they keep coming: alive."""
    path = tmp_path / "run.lock"
    with held_elsewhere(path, clock_offset_s=-3600) as holder, pytest.raises(LockHeldError, match="node17"):
        # Waits three stale periods for it, which ends as soon as it would be broken instead.
        LockFile(path, purpose="submit", stale_after_s=1.0).acquire(timeout_s=3.0, poll_s=0.05)
    assert holder["beat"] > 0


def test_dead_pid_on_this_host_is_broken_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    path = tmp_path / "run.lock"
    _stale_file(path, host=socket.gethostname(), pid=int(dead.stdout), heartbeat=time.time())
    with LockFile(path, purpose="submit"):
        assert LockFile.read_holder(path)["pid"] == os.getpid()


def test_live_pid_on_this_host_with_fresh_heartbeat_is_not_broken(tmp_path):
    path = tmp_path / "run.lock"
    _stale_file(path, host=socket.gethostname(), pid=os.getppid(), heartbeat=time.time())
    with pytest.raises(LockHeldError):
        LockFile(path, purpose="submit").acquire()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    path = tmp_path / "run.lock"
    lock = LockFile(path, purpose="submit").acquire()
    path.unlink()
    _stale_file(path, heartbeat=time.time(), token="someone-else")  # broken as stale and retaken
    lock.release()
    assert LockFile.read_holder(path)["token"] == "someone-else"


def test_heartbeat_thread_keeps_the_lock_fresh(tmp_path):
    path = tmp_path / "run.lock"
    with LockFile(path, purpose="tokenize", heartbeat_s=0.05, stale_after_s=60):
        first = LockFile.read_holder(path)["heartbeat"]
        deadline = time.monotonic() + 30
        while (LockFile.read_holder(path) or {}).get("heartbeat", first) == first:
            assert time.monotonic() < deadline, "no heartbeat written"
            time.sleep(0.01)
    assert not path.exists()


def test_refresh_of_a_lock_taken_by_someone_else_raises(tmp_path):
    path = tmp_path / "run.lock"
    lock = LockFile(path, purpose="submit").acquire()
    _stale_file(path, heartbeat=time.time(), token="someone-else")
    with pytest.raises(LockHeldError):
        lock.refresh()


def _count_under_lock(path: str, counter: str, rounds: int, start, stale_after_s: float) -> None:
    """Read-modify-write of a counter file: any two holders at once lose an increment."""
    start.wait()
    for _ in range(rounds):
        with LockFile(Path(path), purpose="count", timeout_s=120, stale_after_s=stale_after_s):
            value = int(Path(counter).read_text())
            Path(counter).write_text(str(value + 1))


@pytest.mark.parametrize("stale_first", [False, True], ids=["fresh", "breaking-a-stale-lock"])
def test_processes_contending_never_hold_it_together(tmp_path, stale_first):
    path, counter = tmp_path / "run.lock", tmp_path / "counter"
    counter.write_text("0")
    if stale_first:
        # Every process watches it stop beating for the stale period, then they race to break it.
        _stale_file(path)
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_count_under_lock, args=(str(path), str(counter), 40, start, 5.0)) for _ in range(4)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    assert counter.read_text() == str(4 * 40)
    assert not path.exists()
    assert not list(tmp_path.glob("run.lock.breaking.*"))


def test_a_breaker_that_finds_a_fresh_lock_puts_it_back(tmp_path):
    """Two breakers judged the same lock stale; the other one broke it and took the lock before
    this one renamed the file: the fresh lock must survive."""
    path = tmp_path / "run.lock"
    stale = _stale_file(path)
    path.unlink()
    winner = LockFile(path, purpose="submit").acquire()
    LockFile(path, purpose="submit")._break(stale)
    assert LockFile.read_holder(path)["token"] == winner._token
    assert not list(tmp_path.glob("run.lock.breaking.*"))
    winner.release()
    assert not path.exists()


def test_an_unreadable_lock_file_counts_as_held_until_it_is_old(tmp_path):
    """A holder between creating its file and writing it; or an empty file an older dpr-hpc's
    flock left behind, which is broken once older than the stale bound."""
    path = tmp_path / "ledger.lock"
    path.write_text("")
    with pytest.raises(LockHeldError, match="not readable"):
        LockFile(path, purpose="ledger").acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    with LockFile(path, purpose="ledger"):
        assert LockFile.read_holder(path)["pid"] == os.getpid()
