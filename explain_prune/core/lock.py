"""Advisory locks on the directories a job writes (a cache part, an evaluate run dir).

Two writers on one cache part would interleave index lines and shards; two evaluate jobs on one run dir
would answer every sample twice.  The second writer therefore stops at once with one line naming the
lock file and its holder.  The lock is `fcntl.flock`: the kernel drops it when the holder's process
ends, however it ends, so a lock left by a killed job never blocks the rerun.  Readers take no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from explain_prune.core.errors import InputError

_HELD: set[int] = set()  # descriptors of the locks this process holds


def close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the copies of the parent's lock descriptors.
    A flock belongs to the open file, so a child holding a copy would keep the lock alive after
    its parent was killed, and a quick rerun would be refused; the parent's own lock is unaffected."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


class DirLock:
    """An exclusive, non-blocking lock held through the file `path` while a job writes.

    >>> with DirLock(run_dir / ".lock", f"evaluate run dir {run_dir}"):
    ...     ...  # a second process entering here gets InputError at once
    """

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "DirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise InputError(
                f"{self.what} is being written by another job ({holder}; lock file {self.path}); "
                "wait for it to finish, or write elsewhere"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self._fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (best effort: the text may be mid-write)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
