"""Explicit resource cleanup around training (Phase 3): DataLoader worker processes and device caches are released
when training ends, whether it succeeded, failed or was cancelled (SIGTERM is turned into an orderly stop by
wmtp_core.runtime.stopping, so cancellation reaches this cleanup too).

The legacy path (explicit=False) relies on garbage collection instead; a process that dies while a DataLoader
iterator is alive then leaves its worker semaphores behind, which Python's resource_tracker reports at shutdown
("leaked semaphore objects"), the warning the fix plan counts.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Generator, Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


class TrainingResources:
    """Batch streams opened during training, closed (their workers shut down) when the block ends."""

    def __init__(self) -> None:
        self._streams: list[Generator] = []

    def track(self, stream: Generator) -> Iterator:
        self._streams.append(stream)
        return stream

    def release(self, device: str) -> None:
        for stream in self._streams:
            stream.close()  # runs batch_stream's finally: the loader iterator and its worker processes go now
        self._streams.clear()
        gc.collect()
        if device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        elif device == "mps" and torch.backends.mps.is_available():
            torch.mps.empty_cache()


@contextmanager
def training_resources(device: str, *, explicit: bool) -> Iterator[TrainingResources]:
    """Track what training opens; with explicit, release it on every exit path."""
    resources = TrainingResources()
    try:
        yield resources
    finally:
        if explicit:
            resources.release(device)
