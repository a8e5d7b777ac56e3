"""A metrics callback whose failures never stop training (Phase 3's safe tracker).

The training thread only appends to a buffer; a background thread sends it in batches every few seconds and,
while the tracking server is unreachable, keeps the points and retries with backoff. From the first failed send
until a send succeeds again, every unsent point is also written to the run's pending file as it arrives, so a
trainer killed during an outage loses none: the next flow run or `wmtp upload RUN` sends the file. A point can
then be sent twice, which is harmless: MLflow's SQL store skips a point identical to one it has.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from wmtp_core.runtime.redaction import redact_credentials

log = logging.getLogger(__name__)
Point = tuple[str, float, int, int]  # key, value, timestamp in ms, step


class BufferedMetrics:
    """Call it with (step, metrics) from the training loop; call close() once training ends."""

    def __init__(
        self,
        send: Callable[[list[Point]], None],
        *,
        pending_path: Path,
        batch_size: int = 500,
        min_delay_s: float = 5.0,
        max_delay_s: float = 30.0,
    ):
        self._send, self._pending_path, self._batch_size = send, pending_path, batch_size
        self._min_delay, self._max_delay, self._delay = min_delay_s, max_delay_s, min_delay_s
        self._points: list[Point] = []
        self._spilled = 0  # how many of _points (from the front) are in the pending file already
        self._outage = False
        self._lock, self._wake, self._stop = threading.Lock(), threading.Event(), threading.Event()
        self.failed_sends = 0
        self._thread = threading.Thread(target=self._run, name="wmtp-metrics", daemon=True)
        self._thread.start()

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            self._points.extend((key, float(value), now, step) for key, value in metrics.items())
            full = len(self._points) >= self._batch_size
            if self._outage:
                self._spill()
        # Sending every few seconds rather than per report: on a small machine each request costs training
        # a little CPU, on this process and on a loopback server.
        if full:
            self._wake.set()

    def close(self, *, timeout_s: float = 30.0) -> int:
        """Send what can be sent within timeout_s, write the rest to the pending file; returns the points left."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        with self._lock:
            left = len(self._points)
            self._spill()
            self._points, self._spilled = [], 0
        if left:
            log.warning(
                "tracking server unreachable: %d metric points kept in %s for `wmtp upload`",
                left,
                self._pending_path,
            )
        return left

    def _spill(self) -> None:
        """Write the points not yet in the pending file to it (the caller holds the lock)."""
        append_pending(self._pending_path, self._points[self._spilled :])
        self._spilled = len(self._points)

    def _run(self) -> None:
        while True:
            if self.failed_sends and self._delay > self._min_delay:
                self._stop.wait(self._delay)  # backing off: new points must not cut the wait short
            else:
                self._wake.wait(self._delay)
            self._wake.clear()
            with self._lock:
                batch = self._points[: self._batch_size]
            if not batch:
                if self._stop.is_set():
                    return
                continue
            if self._try_send(batch):
                with self._lock:
                    del self._points[: len(batch)]
                    self._spilled = max(0, self._spilled - len(batch))
                    self._outage = False
                    more = bool(self._points)
                if more:
                    self._wake.set()
                elif self._stop.is_set():
                    return  # all sent at close: no final wait of min_delay_s
            elif self._stop.is_set():
                return

    def _try_send(self, batch: list[Point]) -> bool:
        try:
            self._send(batch)
        except Exception as error:  # any tracking failure: keep the points and back off, never raise into training
            self.failed_sends += 1
            with self._lock:
                self._outage = True
                self._spill()
            if self._delay == self._min_delay:  # once per outage, not once per retry
                log.warning(
                    "metrics not sent (%s: %s); buffering and retrying with backoff",
                    type(error).__name__,
                    redact_credentials(str(error).splitlines()[0])[:200],
                )
            self._delay = min(self._delay * 2, self._max_delay)
            return False
        if self._delay > self._min_delay:
            log.warning("tracking server reachable again; sending %d buffered metric points", len(self._points))
        self._delay = self._min_delay
        return True


class SpooledMetrics:
    """The metrics callback of a run whose tracking is spooled (tracking.spool: no MLflow run yet): each report goes
    to the pending file as it comes, which the catch-up (the next flow run, `wmtp upload`) sends."""

    def __init__(self, pending_path: Path):
        self._pending_path = pending_path

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        append_pending(self._pending_path, [(key, float(value), now, step) for key, value in metrics.items()])

    def close(self) -> int:
        return 0


def append_pending(path: Path, points: list[Point]) -> None:
    if not points:
        return
    with path.open("a") as f:
        f.writelines(json.dumps(point) + "\n" for point in points)


def read_pending(path: Path) -> list[Point]:
    if not path.is_file():
        return []
    return [tuple(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
