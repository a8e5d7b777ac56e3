"""BufferedMetrics with a fake sender: nothing is lost when sends fail, batching, and the pending file."""

from __future__ import annotations

import threading
import time

from tracking.metrics_buffer import BufferedMetrics, read_pending


class FlakySender:
    """Records every batch it accepts; refuses while `down` is set, like an unreachable server."""

    def __init__(self):
        self.down = threading.Event()
        self.batches: list[list] = []
        self.refused = 0

    def __call__(self, points):
        if self.down.is_set():
            self.refused += 1
            raise ConnectionError("server down")
        self.batches.append(list(points))


def _steps(sender):
    return [point[3] for batch in sender.batches for point in batch if point[0] == "loss"]


def test_reports_are_sent_in_batches_not_one_request_per_metric(tmp_path):
    sender = FlakySender()
    sink = BufferedMetrics(sender, pending_path=tmp_path / "pending.jsonl", min_delay_s=0.05)
    for step in range(1, 4):
        sink(step, {"loss": 1.0 / step, "lr": 0.1, "grad_norm": 2.0})
    assert sink.close(timeout_s=5) == 0
    assert _steps(sender) == [1, 2, 3]
    assert len(sender.batches) <= 3  # at most one request per report, each carrying all its metrics


def test_an_outage_loses_nothing_and_never_raises_into_training(tmp_path):
    sender = FlakySender()
    sink = BufferedMetrics(sender, pending_path=tmp_path / "pending.jsonl", min_delay_s=0.02, max_delay_s=0.1)
    sink(1, {"loss": 1.0})
    time.sleep(0.2)
    sender.down.set()
    for step in range(2, 30):
        sink(step, {"loss": float(step)})  # must return at once while the server is down
    deadline = time.monotonic() + 10
    while sender.refused < 2 and time.monotonic() < deadline:  # the sender has met the outage, and retried
        time.sleep(0.05)
    sender.down.clear()
    assert sink.close(timeout_s=10) == 0
    assert sender.refused >= 2 and _steps(sender) == list(range(1, 30))


def test_points_still_unsent_at_close_go_to_the_pending_file(tmp_path):
    sender = FlakySender()
    sender.down.set()
    pending = tmp_path / "pending.jsonl"
    sink = BufferedMetrics(sender, pending_path=pending, min_delay_s=0.02, max_delay_s=0.05)
    sink(1, {"loss": 0.5, "lr": 0.1})
    sink(2, {"loss": 0.25})
    assert sink.close(timeout_s=5) == 3
    assert [(key, value, step) for key, value, _, step in read_pending(pending)] == [
        ("loss", 0.5, 1),
        ("lr", 0.1, 1),
        ("loss", 0.25, 2),
    ]


def test_close_returns_as_soon_as_everything_is_sent(tmp_path):
    sent = []
    buffer = BufferedMetrics(sent.append, pending_path=tmp_path / "pending.jsonl", min_delay_s=5.0)
    buffer(1, {"loss": 1.0})
    started = time.monotonic()
    assert buffer.close() == 0
    assert time.monotonic() - started < 2.0 and len(sent) == 1


def test_the_first_failed_send_spills_every_unsent_point_and_outage_points_follow_at_once(tmp_path):
    sender = FlakySender()
    sender.down.set()
    pending = tmp_path / "pending.jsonl"
    sink = BufferedMetrics(sender, pending_path=pending, min_delay_s=0.02, max_delay_s=5.0)
    sink(1, {"loss": 1.0})
    sink(2, {"loss": 0.5})
    deadline = time.monotonic() + 5
    while sender.refused < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert [point[3] for point in read_pending(pending)] == [1, 2]  # before close: a SIGKILL now loses nothing
    sink(3, {"loss": 0.25})  # reported during the outage: on disk before the call returns
    assert [point[3] for point in read_pending(pending)] == [1, 2, 3]
    sender.down.clear()
    assert sink.close(timeout_s=10) == 0
    assert _steps(sender) == [1, 2, 3]
    assert [point[3] for point in read_pending(pending)] == [1, 2, 3]  # sent again by `wmtp upload`: harmless
