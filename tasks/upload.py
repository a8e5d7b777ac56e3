"""Tasks: open the MLflow run, and upload checkpoints and the run summary to it (with retries and backoff)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks import tracking
from wmtp_core.config import Recipe


@task(name="open_tracking_run", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE)
def open_tracking_run(recipe: Recipe, run_dir: str, *, run_name: str, flow_run_id: str | None) -> str | None:
    """The MLflow run for this WMTP run (created once, reused by every resume); None when tracking is off."""
    if not recipe.tracking.enabled:
        return None
    tags = {"prefect.flow_run_id": flow_run_id} if flow_run_id else {}
    run_id = tracking.open_tracking_run(recipe, Path(run_dir), run_name=run_name, extra_tags=tags)
    get_run_logger().info("MLflow run %s at %s", run_id, tracking.tracking_uri())
    return run_id


@task(name="upload_artifacts", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE)
def upload_artifacts(run_dir: str, summary: dict, *, mlflow_run_id: str | None) -> list[str]:
    """Write summary.json, upload it and every checkpoint not yet uploaded; safe to retry (idempotent)."""
    summary_file = Path(run_dir) / "summary.json"
    summary_file.write_text(json.dumps(summary, indent=2))
    if mlflow_run_id is None:
        return []
    uploaded = tracking.upload_checkpoints(mlflow_run_id, Path(run_dir))
    tracking.upload_file(mlflow_run_id, summary_file)
    tracking.finish_tracking_run(mlflow_run_id, succeeded=summary["status"] == "completed")
    get_run_logger().info("uploaded %s to MLflow run %s", uploaded or "no new checkpoints", mlflow_run_id)
    return uploaded
