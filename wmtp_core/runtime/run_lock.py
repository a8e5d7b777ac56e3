"""One trainer per run: an OS lock (flock) on the run's train.lock, so two trainers of one run cannot train at once.

The kernel releases the lock when its holder dies, however it dies and whatever host wrote the file, so a lock
left by a crashed pod or a restarted container never blocks a resume, and there is no takeover to race. The
file is never unlinked (a process that opened it before the unlink would lock an orphan inode while a newcomer
locks a fresh file); its content only names the holder (host, pid, since) for the refusal message.

The holder is a process: nested holds in it (the CLI around its flow run, the flow around its training task) share
its one hold, which ends with the outermost. So whoever is refused is refused before it touches anything of the run.

Network file systems: Linux emulates flock on NFS with POSIX byte-range locks held by the NFS server, so the
lock excludes trainers on every client that mounts the run directory. When a client dies, an NFSv4 server
keeps its locks until the client's lease expires (90 s by default), so a resume started within that time is
refused and succeeds on the next attempt. Mounts with `local_lock=flock` or `nolock` make the lock local to
each client: there, only one host must train a given run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wmtp_core.layout import RunLayout


class RunLockedError(RuntimeError):
    """Another live process is training this run."""


_held: dict[str, list[int]] = {}
"""The run locks this process holds: lock file path -> [descriptor, nesting depth]."""
_held_guard = threading.Lock()


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run's lock for the duration of the block (released on any exit, and by the kernel on death); a hold
    nested in this process's own shares it. Raises RunLockedError, naming the holder, when another process holds it."""
    key = os.path.realpath(RunLayout(run_dir).lock)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(Path(key)), 1]
    try:
        yield
    finally:
        with _held_guard:
            _held[key][1] -= 1
            if not _held[key][1]:
                os.close(_held.pop(key)[0])  # closing the last descriptor releases the flock


def _acquire(path: Path) -> int:
    # Looked up by path, never by opening the file again: on NFS a flock is a POSIX lock, which closing any other
    # descriptor of the file in this process would release.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunLockedError(_refusal(path)) from None
    _record_holder(fd)
    return fd


def _record_holder(fd: int) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)


def _refusal(path: Path) -> str:
    holder = _read_holder(path)
    who = (
        f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
        if holder
        else "a process that is just starting (it has not written its name yet)"
    )
    return f"run {path.parent.name} is being trained by {who}; wait for it to finish (or stop it), then resume"


def _read_holder(path: Path) -> dict | None:
    """The holder recorded in the lock file, or None while the holder has not written it yet."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) and {"host", "pid", "since"} <= holder.keys() else None
