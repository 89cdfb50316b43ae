"""Waiting on a state, never on a fixed sleep: the tests that race or outlast a run poll for
what they need (a file, a count) under a deadline that only a hang reaches."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, timeout_s: float = 300, poll_s: float = 0.05) -> T:
    """`check()` once it returns something truthy; AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(poll_s)
    return result


# A barrier for lock races: each contender notes when it finds the lock held, and the holder
# waits inside its critical section until every other contender has noted it. The race then
# happens on every run, however skewed the processes' start-up, instead of when a sleep inside
# the critical section happens to be longer than the skew.

def note_lock_waits(log: Path, lock_name_end: str) -> None:
    """From now on, this process appends its pid to `log` whenever it finds a lock whose file
    name ends with `lock_name_end` held by another (dpr_hpc.locks.LockFile)."""
    from dpr_hpc.locks import LockFile

    create = LockFile._try_create

    def noting(self) -> bool:
        created = create(self)
        if not created and self.path.name.endswith(lock_name_end):
            with open(log, "a") as handle:
                handle.write(f"{os.getpid()}\n")
        return created

    LockFile._try_create = noting


def wait_for_lock_waiters(log: Path, count: int, timeout_s: float = 120) -> None:
    """Block (the lock's holder) until `count` other processes have found the lock held."""
    def waiters() -> set[str]:
        return set(log.read_text().split()) - {str(os.getpid())} if log.exists() else set()

    wait_until(lambda: len(waiters()) >= count, f"{count} process(es) to wait on the lock", timeout_s)
