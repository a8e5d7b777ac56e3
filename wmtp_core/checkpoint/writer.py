"""Runs a checkpoint save in three parts, stage, write and settle, at most one in flight, in the caller's thread or
in the background; a background failure is raised at the next save or at wait(), never lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from wmtp_core.checkpoint.manifest import CheckpointError
from wmtp_core.checkpoint.staging import StagingBuffers


class CheckpointWriter:
    """Runs checkpoint saves in two parts: write (publish a checkpoint, return its path) and settle (make it durable,
    then prune older ones).

    Synchronous (the default): write runs in the caller's thread, settle in a background thread, so training goes
    on while the disk flushes. checkpoint.async_save: stage (a copy of the live state into kept CPU buffers), write
    and settle all run in the background; the copy overlaps the next step's forward and backward, which read the
    weights but do not change them, and the optimizer step waits for it (`guard`), as torchtitan's pinned-memory
    async checkpointing does. Either way at most one save is in flight: a new one first waits for the previous.
    `wait()` must run before the process exits; a background failure is raised there (or at the next save).
    """

    def __init__(self, *, background: bool):
        self.background = background
        self._buffers = StagingBuffers()  # background saves copy the live state into these, save after save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staged = threading.Event()
        self._staged.set()
        self.staging_wait_s = 0.0
        """Seconds training has waited in guard() for a snapshot to finish (what the overlap did not hide)."""
        self.latest: Path | None = None
        self.saved: list[Path] = []
        """Every checkpoint this writer published, in order (hashed while written: valid by construction)."""
        self.settled: object = None
        """What the newest save's settle returned (the run's checkpoints as its pruning listed them)."""

    def submit(
        self,
        write: Callable[[], Path],
        settle: Callable[[Path], object] | None = None,
        *,
        snapshot: dict | None = None,
        live: set[int] = frozenset(),
    ) -> None:
        """Save: write() (publish, return the path), then settle(path).

        snapshot is the dict of state write() reads. In the background, its live tensors (storages in `live`:
        wmtp_core.checkpoint.staging.live_storages) are first replaced in it by copies, in the writer's thread;
        until the copy is done nothing may change them: an optimizer passed to guard() waits for it.
        """
        self.wait()
        if self.background:
            self._staged.clear()
            self._start(lambda: self._save(snapshot, live, write, settle))
            return
        self.latest = path = write()
        self.saved.append(path)
        if settle is not None:
            self._start(lambda: self._settle(settle, path))

    def guard(self, optimizer: torch.optim.Optimizer) -> None:
        """Make optimizer.step() wait for a pending snapshot, so it never changes the state while it is copied."""
        if self.background:
            optimizer.register_step_pre_hook(lambda *_: self.wait_for_staging())

    def wait_for_staging(self) -> None:
        """Block until the pending save's snapshot is complete (at once when none is being taken)."""
        if not self._staged.is_set():
            started = time.perf_counter()
            self._staged.wait()
            self.staging_wait_s += time.perf_counter() - started

    def wait(self) -> Path | None:
        """Block until no save is pending; re-raise a background failure; return the newest checkpoint."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"background checkpoint write failed: {error}") from error
        return self.latest

    def _save(
        self, snapshot: dict | None, live: set[int], write: Callable[[], Path], settle: Callable[[Path], object] | None
    ) -> None:
        try:
            if snapshot is not None:
                snapshot.update(self._buffers.snapshot(snapshot, live))
        finally:
            self._staged.set()  # also when staging failed: the error reaches training at the next save or wait()
        self.latest = path = write()
        self.saved.append(path)
        if settle is not None:
            self._settle(settle, path)

    def _settle(self, settle: Callable[[Path], object], path: Path) -> None:
        self.settled = settle(path)

    def _start(self, work: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(work,), name="wmtp-checkpoint-writer")
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error
