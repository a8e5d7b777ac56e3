"""Stop signals while a torchrun job runs: this process passes them on, so every rank saves before it stops.

The job runs in a session of its own, so the terminal's Ctrl-C reaches only this process, which decides:
- SIGTERM (a Prefect cancellation, `timeout`, a preemption) and a first Ctrl-C go to torchrun, which sends the same
  signal to every rank; each rank saves a checkpoint after its current step and stops (the run ends "stopped").
  SIGTERM is passed on once (torchrun already waits for the ranks' saves); a rank that gets SIGTERM directly as
  well (Slurm signals every process of a job) only sets its stop flag again.
- A second Ctrl-C kills the ranks and torchrun at once and raises KeyboardInterrupt: abort without saving.
torchrun waits 30 s for its ranks after passing a signal on, then kills them: one step plus one save must fit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

from wmtp_core.runtime.stopping import install_stop_handlers, restore_handlers

TERMINATE_GRACE_S = 30  # Prefect's own grace between SIGTERM and SIGKILL on cancellation


class forwarded_stop_signals:
    """While the job runs, SIGTERM and SIGINT to this process are passed on to torchrun (main thread only:
    Python's rule); on leaving, a job still running is stopped (an exception here must not leave it running)."""

    def __init__(self, process: subprocess.Popen, log: logging.Logger):
        self.process, self.log = process, log
        self.interrupted = self.terminated = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> forwarded_stop_signals:
        self.previous = install_stop_handlers(self._on_sigterm, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        restore_handlers(self.previous)
        if self.process.poll() is None:
            stop_job(self.process)

    def _on_sigterm(self, signum, frame) -> None:
        if self.terminated:
            return  # torchrun has it already, and is waiting for the ranks' saves
        self.terminated = True
        self.log.warning("SIGTERM: every rank saves a checkpoint after its current step, then stops")
        self.process.send_signal(signal.SIGTERM)

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:
            self.log.warning("second Ctrl-C: killing every rank without saving (the newest checkpoint is kept)")
            kill_job(self.process)
            raise KeyboardInterrupt
        self.interrupted = True
        self.log.warning(
            "Ctrl-C: every rank saves a checkpoint after its current step, then stops (Ctrl-C again to abort)"
        )
        self.process.send_signal(signal.SIGINT)


def stop_job(process: subprocess.Popen) -> None:
    """SIGTERM (torchrun passes it to every rank, which saves and exits), then SIGKILL after Prefect's grace."""
    process.terminate()
    try:
        process.wait(timeout=TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        kill_job(process)


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL torchrun's ranks (each leads a process group of its own, with its DataLoader workers), then torchrun."""
    for rank_pid in child_pids(process.pid):
        with contextlib.suppress(ProcessLookupError):  # the rank ended on its own meanwhile
            os.killpg(rank_pid, signal.SIGKILL)
    process.kill()
    process.wait()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is pid, read from /proc (Linux). Elsewhere none are found: the ranks, already
    told to stop by the first signal, end after their save."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()  # "(name)" may hold spaces; state, ppid follow
        except (OSError, IndexError):  # the process ended while we looked
            continue
        if int(after_name[1]) == pid:
            children.append(int(stat.parent.name))
    return children
