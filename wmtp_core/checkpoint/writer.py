"""Runs a checkpoint save in two parts, write then settle, at most one in flight, in the caller's thread or in the
background; a background failure is raised at the next save or at wait(), never lost."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from wmtp_core.checkpoint.manifest import CheckpointError


class CheckpointWriter:
    """Runs checkpoint saves in two parts: write (publish a checkpoint, return its path) and settle (make it durable,
    then prune older ones).

    Synchronous (the default): write runs in the caller's thread, settle in a background thread, so training goes
    on while the disk flushes. checkpoint.async_save: both run in the background. Either way at most one save is in
    flight: a new one first waits for the previous. `wait()` must run before the process exits; a background
    failure is raised there (or at the next save), never lost.
    """

    def __init__(self, *, background: bool):
        self.background = background
        self._stager: DefaultStager | None = None  # snapshot_shards' CPU buffers, refilled at every save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.latest: Path | None = None
        self.saved: list[Path] = []
        """Every checkpoint this writer published, in order (hashed while written: valid by construction)."""

    def submit(self, write: Callable[[], Path], settle: Callable[[Path], None] | None = None) -> None:
        self.wait()
        if self.background:
            self._start(lambda: self._save(write, settle))
            return
        self.latest = path = write()
        self.saved.append(path)
        if settle is not None:
            self._start(lambda: settle(path))

    def snapshot_shards(self, shards: dict, *, pin_memory: bool) -> dict:
        """This rank's shards copied to CPU memory (DTensors stay DTensors; pin_memory for shards on a GPU, so the
        copy is fast) for a background write while training changes the originals. The buffers are kept and refilled
        at the next save, so this first waits for the pending write, which may still be reading them."""
        self.wait()
        if self._stager is None:
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=pin_memory,
                    use_shared_memory=False,
                    use_async_staging=False,
                    use_non_blocking_copy=False,
                )
            )
        return self._stager.stage(shards)

    def wait(self) -> Path | None:
        """Block until no save is pending; re-raise a background failure; return the newest checkpoint."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"background checkpoint write failed: {error}") from error
        return self.latest

    def _save(self, write: Callable[[], Path], settle: Callable[[Path], None] | None) -> None:
        self.latest = path = write()
        self.saved.append(path)
        if settle is not None:
            settle(path)

    def _start(self, work: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(work,), name="wmtp-checkpoint-writer")
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error
