"""The training progress artifact: a (step, metrics) callback that keeps a Prefect progress bar at step/max_steps.

It also remembers the last training loss for the run summary. Updates are throttled (one API request every few
seconds at most), and a failed update is logged, never raised: a progress bar must not stop a training run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.reporting import artifact_key

log = logging.getLogger(__name__)
MetricsCallback = Callable[[int, dict[str, float]], None]


class TrainingProgress:
    """Call it with (step, metrics) from the training loop (directly or through `reporting_to`); `finish` at the end."""

    def __init__(self, run_name: str, *, max_steps: int, start_step: int = 0, min_interval_s: float = 5.0):
        self.max_steps, self.min_interval_s = max_steps, min_interval_s
        self.step, self.last_loss, self.last_update = start_step, None, time.monotonic()
        self.artifact_id = create_progress_artifact(
            self.percent(), key=artifact_key("wmtp-progress", run_name), description=self.describe()
        )

    def percent(self) -> float:
        return round(100.0 * min(self.step, self.max_steps) / self.max_steps, 1)

    def describe(self) -> str:
        loss = f", loss {self.last_loss:.4f}" if self.last_loss is not None else ""
        return f"step {self.step}/{self.max_steps}{loss}"

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.step = max(self.step, step)
        if "loss" in metrics:
            self.last_loss = float(metrics["loss"])
        if time.monotonic() - self.last_update >= self.min_interval_s:
            self.update()

    def reporting_to(self, sink: MetricsCallback | None) -> MetricsCallback:
        """One callback for the training loop: the metrics sink (MLflow) first, then this progress bar."""
        if sink is None:
            return self

        def report(step: int, metrics: dict[str, float]) -> None:
            sink(step, metrics)
            self(step, metrics)

        return report

    def update(self) -> None:
        self.last_update = time.monotonic()
        try:
            update_progress_artifact(self.artifact_id, self.percent(), description=self.describe())
        except httpx.HTTPError as error:  # PrefectHTTPStatusError included
            log.warning("progress artifact not updated (training goes on): %s", error)

    def finish(self, result: dict) -> dict:
        """The final update at the step reached; returns the training result with the last training loss added."""
        self.step = result["steps"]
        self.update()
        return {**result, "final_loss": self.last_loss}
