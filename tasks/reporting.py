"""Tasks: the artifacts on a flow run's Artifacts tab: the run summary (markdown) and the run's checkpoints (table);
and the training progress bar the train task keeps up to date (TrainingProgress).

A progress update is throttled (one API request every few seconds at most), and a failed update is logged, never
raised: a progress bar must not stop a training run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from wmtp_core.checkpoint.manifest import CheckpointInfo, list_checkpoints
from wmtp_core.run.summary import RunSummary

log = logging.getLogger(__name__)
MetricsCallback = Callable[[int, dict[str, float]], None]


def artifact_key(prefix: str, run_name: str) -> str:
    """A Prefect artifact key for a run: lowercase letters, digits and dashes only (Prefect's rule)."""
    return (prefix + "-" + "".join(c if c.isalnum() else "-" for c in run_name.lower()))[:100]


def summary_markdown(summary: RunSummary) -> str:
    """The summary as a small markdown table: the outcome, the figures, where the results are, the gates used."""
    rows = {
        "reason": summary.reason,
        "stopped by": summary.stop_reason,
        "steps": _steps(summary),
        "final training loss": _number(summary.final_loss),
        "eval loss": _eval_losses(summary),
        "tokens/s": _number(summary.tokens_per_s, ".0f"),
        "skipped steps": summary.skipped_steps,
        "checkpoint": f"`{summary.latest_checkpoint}`" if summary.latest_checkpoint else None,
        "MLflow run": summary.mlflow_link or "tracking off",
        "uploads": summary.uploads,
        "phase gates": ", ".join(f"{name}={'on' if on else 'off'}" for name, on in summary.phases.model_dump().items()),
    }
    title = f"# WMTP run `{summary.run_name}`: {summary.status}"
    table = [f"| {name} | {value} |" for name, value in rows.items() if value not in (None, "")]
    return "\n".join([title, "", "| | |", "|---|---|", *table])


def _steps(summary: RunSummary) -> str:
    resumed = summary.resumed_from_step
    return f"{summary.steps}" + (f" (resumed from step {resumed})" if resumed is not None else "")


def _eval_losses(summary: RunSummary) -> str | None:
    initial, final = summary.initial_eval_loss, summary.final_eval_loss
    if final is None:
        return None
    return f"{_number(final)} (at the start: {_number(initial)})" if initial is not None else _number(final)


def _number(value: float | None, spec: str = ".4f") -> str | None:
    return None if value is None else format(value, spec)


@task(name="publish_summary", cache_policy=NO_CACHE)
def publish_summary(summary: RunSummary) -> None:
    """Create the run-summary markdown artifact (key: wmtp-summary-<run>)."""
    create_markdown_artifact(
        summary_markdown(summary), key=artifact_key("wmtp-summary", summary.run_name), description="WMTP run summary"
    )


def checkpoint_rows(run_dir: Path, listed: list[dict] | None = None) -> list[dict]:
    """One row per checkpoint directory of the run, oldest first (sizes checked; `wmtp checkpoints` checks digests).
    listed: the run's checkpoints as training's last pruning listed them ({step, path, valid, problem}); without it
    (a failed training) the run directory is listed here."""
    infos = [CheckpointInfo(**{**row, "path": Path(row["path"])}) for row in listed or ()]
    rows = []
    for info in infos or list_checkpoints(run_dir, checksums=False):
        size_mb = sum(f.stat().st_size for f in info.path.rglob("*") if f.is_file()) / 2**20
        rows.append(
            {
                "step": info.step,
                "complete": info.valid,
                "size_mb": round(size_mb, 2),
                "path": str(info.path),
                "problem": info.problem or "",
            }
        )
    return rows


@task(name="publish_checkpoints", cache_policy=NO_CACHE)
def publish_checkpoints(run_name: str, run_dir: str, *, listed: list[dict] | None = None) -> None:
    """Create the table artifact of the run's checkpoints (key: wmtp-checkpoints-<run>); listed: checkpoint_rows'."""
    create_table_artifact(
        checkpoint_rows(Path(run_dir), listed),
        key=artifact_key("wmtp-checkpoints", run_name),
        description=f"Checkpoints of run {run_name} (step, complete, size, path)",
    )


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
