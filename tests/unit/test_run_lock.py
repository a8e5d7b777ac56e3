"""One trainer per run: the lock refuses a second holder by name, survives exceptions, and replaces stale locks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from wmtp_core.runtime.run_lock import LOCK_FILE, RunLockedError, run_lock


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
            with run_lock(tmp_path):
                pass


def test_lock_is_released_when_training_raises(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run_lock(tmp_path):
            1 / 0
    assert not (tmp_path / LOCK_FILE).exists()
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "since": "2026-01-01T00:00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_held_by_another_live_process_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = {"host": socket.gethostname(), "pid": holder.pid, "since": "2026-01-01T00:00:00"}
        (tmp_path / LOCK_FILE).write_text(json.dumps(alive))
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with run_lock(tmp_path):
                pass
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # left untouched
    finally:
        holder.kill()
        holder.wait()
