"""Server processes on loopback ports: a free port, a process in its own session with its output in a log, waiting
until it answers, and stopping its whole process group. Used by `wmtp ui`, and by the benchmarks and tests that
start real servers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the system picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a server could bind port on 127.0.0.1 now."""
    with socket.socket() as s:
        # As servers bind (SO_REUSEADDR): a port left in TIME_WAIT by a server just stopped counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def start_in_own_session(command: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start command with its output appended to log, in a session of its own: the terminal's Ctrl-C does not reach
    it, and stop_process_group ends it together with the workers it starts."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as output:
        return subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process_group(process: subprocess.Popen | None, first: signal.Signals, *, grace_s: float) -> None:
    """Send `first` to the process's group (started with start_new_session=True), then SIGKILL after grace_s."""
    if process is None:
        return
    try:
        os.killpg(process.pid, first)
    except ProcessLookupError:  # the group is gone: the leader and every worker have exited
        process.wait()
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
    _kill_stragglers(process.pid)


def _kill_stragglers(group: int) -> None:
    # Workers of a leader that exited on `first` may still be running in its group: end them too. Usually none
    # is left, and killpg finds no group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def wait_for_http(url: str, process: subprocess.Popen, *, timeout_s: float, log: Path) -> None:
    """Poll url until it answers; raise when the process exits or the time is up (the log says why)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"nothing answered on {url} within {timeout_s} s; see {log}")
