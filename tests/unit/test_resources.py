"""Phase 3's explicit cleanup of what training holds open: tracked streams are closed when training raises; the legacy
path (phases.api off) leaves them to garbage collection. Worker processes that are cancelled or exit without
interpreter teardown: tests/integration/test_worker_exit.py."""

from __future__ import annotations

import pytest

from wmtp_core.runtime.resources import training_resources


def test_tracked_streams_are_closed_when_training_raises():
    closed = []

    def stream():
        try:
            yield 1
        finally:
            closed.append(True)

    with pytest.raises(RuntimeError):
        with training_resources("cpu", explicit=True) as resources:
            next(resources.track(stream()))
            raise RuntimeError("training failed")
    assert closed == [True]


def test_legacy_path_leaves_streams_to_garbage_collection():
    kept = []

    def stream():
        try:
            yield 1
        finally:
            kept.append("closed")

    live = None
    with training_resources("cpu", explicit=False) as resources:
        live = resources.track(stream())
        next(live)
    assert kept == []  # still open: nothing closed it explicitly
    live.close()
