"""Tasks: open the MLflow run, and upload checkpoints and the run summary to it (with retries and backoff)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL
from prefect.tasks import exponential_backoff

from tracking import client as tracking
from wmtp_core.checkpoint.manifest import Verdicts
from wmtp_core.run.plan import read_plan
from wmtp_core.run.summary import RunSummary


@task(
    name="open_tracking_run",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    cache_policy=NO_CACHE,
)
def open_tracking_run(plan_file: str, *, flow_run_id: str | None) -> str | None:
    """The MLflow run for this WMTP run (created once, reused by every resume); None when tracking is off."""
    run_plan = read_plan(Path(plan_file))
    recipe = run_plan.recipe
    if not recipe.tracking.enabled:
        return None
    tags = {"prefect.flow_run_id": flow_run_id} if flow_run_id else {}
    # The MLflow run links back to the Prefect run where Prefect has a UI: without one, flow_run.ui_url is
    # "None/flow-runs/...".
    if flow_run_id and PREFECT_UI_URL.value():
        tags["prefect.flow_run_url"] = flow_run.ui_url
    run_id = tracking.open_tracking_run(recipe, run_plan.run_dir, run_name=recipe.run.name, extra_tags=tags)
    tracking.log_environment_tags(run_id, run_plan.probe.to_dict())
    get_run_logger().info("MLflow run %s at %s", run_id, tracking.tracking_uri())
    return run_id


@task(
    name="upload_artifacts", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE
)
def upload_artifacts(summary: RunSummary, *, verdicts: Verdicts | None = None) -> list[str]:
    """Write summary.json, then upload it, every checkpoint and any pending metrics not yet uploaded (idempotent);
    verdicts: checkpoints the flow run has verified or saved already, not hashed again."""
    summary.write()
    if summary.mlflow_run_id is None:
        return []
    return tracking.upload_run(
        summary.mlflow_run_id,
        Path(summary.run_dir),
        succeeded=summary.status == "completed",
        finished=summary.status != "stopped",
        verdicts=verdicts,
    )


@task(name="record_pending_uploads", cache_policy=NO_CACHE)
def record_pending_uploads(summary: RunSummary, *, reason: str) -> RunSummary:
    """Phase 3: uploads that failed after their retries are owed, not fatal; note them for the next run or `wmtp
    upload`."""
    tracking.record_pending_uploads(Path(summary.run_dir), reason)
    summary = summary.model_copy(update={"uploads": "pending", "uploads_reason": reason})
    summary.write()
    get_run_logger().warning(
        "uploads to MLflow failed (%s); they are pending: run `wmtp upload %s`", reason, summary.run_name
    )
    return summary
