"""Stopping a run early without losing work: Ctrl-C, SIGTERM (a Prefect cancellation, a spot reclaim) or a time budget.

The training loop polls `StopRequest.reason()` after every optimizer step; when it says stop, the loop saves a
checkpoint at the current step and ends. A signal handler only sets a flag (the loop, not the handler, does the
save) because a handler may run in the middle of an optimizer step. Prefect kills a cancelled run 30 s after
SIGTERM, so one step plus one save must fit in that grace.

Ctrl-C (SIGINT) stops the same way, but as a user's choice rather than a cancellation: training returns normally
(stop_reason "Ctrl-C"), so the run is summarised and uploaded and `wmtp resume` continues it. A second Ctrl-C
aborts at once (KeyboardInterrupt), without waiting for the step or the save.

A command that runs training (`wmtp train`) handles SIGTERM outside a training step with `sigterm_raises`: the
signal raises Terminated where the command is, so it ends with one line and its cleanup run, not killed mid-way.
Exit statuses follow the shell's convention (128 + the signal): 130 after Ctrl-C, 143 after SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

log = logging.getLogger(__name__)
STOP_REASONS = (None, "time budget", "Ctrl-C", "SIGTERM")
"""Lowest severity first: ranks told different things agree on the most severe (see StopRequest.severity)."""
EXIT_STATUS = {"Ctrl-C": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}
"""A command's exit status after a stop in order, by stop reason: 130 and 143, as a shell reports the signals."""


class TrainingInterrupted(RuntimeError):
    """A SIGTERM ended training; a checkpoint at the step reached was saved, resume continues from it."""


class Terminated(BaseException):
    """SIGTERM reached the process outside a training step (while starting, saving its summary, uploading): the
    command ends now. A BaseException, as KeyboardInterrupt is, so no `except Exception` takes it for a failure."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread for the block (a training step inside it handles the signal
    itself: StopRequest and the torchrun job's handlers replace this one while they run)."""
    if threading.current_thread() is not threading.main_thread():  # Python's rule: handlers in the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


class StopRequest:
    """Collects reasons to stop: SIGTERM and SIGINT while installed, and an optional wall-clock budget from
    construction."""

    def __init__(self, time_budget_s: float | None = None, *, handle_signals: bool = True):
        self.deadline = time.monotonic() + time_budget_s if time_budget_s is not None else None
        self.handle_signals = handle_signals  # off: the legacy behaviour, a signal ends the process at once
        self.signalled: str | None = None
        self._previous: dict[int, object] = {}

    def reason(self) -> str | None:
        """'SIGTERM', 'Ctrl-C', 'time budget' or None (keep training)."""
        if self.signalled:
            return self.signalled
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "time budget"
        return None

    def severity(self) -> int:
        """reason() as a number ranks can agree on with a max: 0 go on, 1 time budget, 2 Ctrl-C, 3 SIGTERM."""
        return STOP_REASONS.index(self.reason())

    def __enter__(self) -> StopRequest:
        if self.handle_signals:
            self._previous = install_stop_handlers(self._on_sigterm, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        restore_handlers(self._previous)
        self._previous = {}

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = "SIGTERM"
        log.warning("SIGTERM received: saving a checkpoint after the current step, then stopping")

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled:
            log.warning("second Ctrl-C: aborting without saving (the newest checkpoint on disk is kept)")
            raise KeyboardInterrupt
        self.signalled = "Ctrl-C"
        log.warning("Ctrl-C: saving a checkpoint after the current step, then stopping (Ctrl-C again to abort)")


SignalHandler = Callable[[int, FrameType | None], None]


def install_stop_handlers(on_sigterm: SignalHandler, on_sigint: SignalHandler) -> dict[int, object]:
    """Handle SIGTERM and SIGINT; returns the handlers they replace, for restore_handlers. Python delivers signals to
    the main thread only: elsewhere (a Prefect worker thread) nothing is installed and the parent process owns them."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers = {signal.SIGTERM: on_sigterm, signal.SIGINT: on_sigint}
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}


def restore_handlers(previous: dict[int, object]) -> None:
    """Put back the handlers install_stop_handlers replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
