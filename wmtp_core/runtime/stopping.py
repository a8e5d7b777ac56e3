"""Stopping a run early without losing work: SIGTERM (a Prefect cancellation, a spot reclaim) or a time budget.

The training loop polls `StopRequest.reason()` after every optimizer step; when it says stop, the loop saves a
checkpoint at the current step and ends. A signal handler only sets a flag (the loop, not the handler, does the
save) because a handler may run in the middle of an optimizer step. Prefect kills a cancelled run 30 s after
SIGTERM, so one step plus one save must fit in that grace.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

log = logging.getLogger(__name__)
STOP_REASONS = (None, "time budget", "SIGTERM")


class TrainingInterrupted(RuntimeError):
    """A SIGTERM ended training; a checkpoint at the step reached was saved, resume continues from it."""


class StopRequest:
    """Collects reasons to stop: SIGTERM while installed, and an optional wall-clock budget from construction."""

    def __init__(self, time_budget_s: float | None = None, *, handle_sigterm: bool = True):
        self.deadline = time.monotonic() + time_budget_s if time_budget_s is not None else None
        self.handle_sigterm = handle_sigterm  # off: the legacy behaviour, SIGTERM ends the process at once
        self.signalled: str | None = None
        self._previous: dict[int, object] = {}

    def reason(self) -> str | None:
        """'SIGTERM', 'time budget' or None (keep training)."""
        if self.signalled:
            return self.signalled
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "time budget"
        return None

    def severity(self) -> int:
        """reason() as a number ranks can agree on with a max: 0 go on, 1 time budget, 2 signal."""
        return STOP_REASONS.index(self.reason())

    def __enter__(self) -> StopRequest:
        # Python delivers signals to the main thread only; elsewhere (a Prefect worker thread) there is nothing
        # to install and the parent process owns the signal.
        if self.handle_sigterm and threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = "SIGTERM"
        log.warning("%s received: saving a checkpoint after the current step, then stopping", self.signalled)
