"""One trainer per run: a lock file in the run directory, so two resumes of the same run cannot train at once.

The lock records who holds it (host, pid, since when). A lock left by a process that no longer exists on this
host is stale and is taken over; a lock held by a live process (or by another host, which cannot be checked
from here) is refused with a message naming the holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_FILE = "train.lock"


class RunLockedError(RuntimeError):
    """Another live process is training this run."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run's lock for the duration of the block (released on any exit, including exceptions)."""
    path = run_dir / LOCK_FILE
    _acquire(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _acquire(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None and time.time() - path.stat().st_mtime < 10:
                holder = {"host": "this host", "pid": "?", "since": "a moment ago"}  # being written right now
            if holder is not None and (holder["pid"] == "?" or _is_alive(holder)):
                raise RunLockedError(
                    f"run {path.parent.name} is being trained by pid {holder['pid']} on {holder['host']} since "
                    f"{holder['since']}; wait for it to finish (or stop it), then resume"
                ) from None
            log.warning("taking over the stale lock %s (holder %s is gone)", path, holder)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise RunLockedError(f"could not take the lock {path}: another process took it at the same moment; retry")


def _read_holder(path: Path) -> dict | None:
    """The holder recorded in the lock, or None when the file is unreadable (a writer died mid-write)."""
    try:
        holder = json.loads(path.read_text())
        return holder if {"host", "pid", "since"} <= holder.keys() else None
    except (OSError, json.JSONDecodeError):
        return None


def _is_alive(holder: dict) -> bool:
    if holder["host"] != socket.gethostname():
        return True  # cannot check another host's processes: assume the holder is alive
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
