"""Tasks: open the MLflow run (or spool the run's tracking while the server is unreachable), and upload checkpoints
and the run summary to it (with retries and backoff)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL
from prefect.tasks import exponential_backoff

from tracking import artifacts, spool
from tracking import client as tracking
from wmtp_core.checkpoint.manifest import Verdicts
from wmtp_core.run.plan import RunPlan, read_plan
from wmtp_core.run.summary import RunSummary


@task(
    name="open_tracking_run",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    cache_policy=NO_CACHE,
)
def open_tracking_run(plan_file: str, *, flow_run_id: str | None) -> str | None:
    """The MLflow run for this WMTP run (created once, reused by every resume); None when tracking is off, or
    spooled: with phases.api on, a tracking server unreachable at the start does not stop the run (tracking.spool)."""
    run_plan = read_plan(Path(plan_file))
    recipe = run_plan.recipe
    if not recipe.tracking.enabled:
        return None
    tags = _prefect_tags(flow_run_id)
    unreachable = spool.unreachable_reason(tracking.tracking_uri())
    if unreachable and run_plan.gates.tracking_never_stops_training:
        return _spooled(run_plan, unreachable, tags=tags)
    run_id = tracking.open_tracking_run(recipe, run_plan.run_dir, run_name=recipe.run.name, extra_tags=tags)
    tracking.log_environment_tags(run_id, run_plan.probe.to_dict())
    get_run_logger().info("MLflow run %s at %s", run_id, tracking.tracking_address())
    return run_id


@task(name="spool_tracking", cache_policy=NO_CACHE)
def spool_tracking(plan_file: str, *, reason: str, flow_run_id: str | None) -> str | None:
    """Phase 3, when the MLflow run could not be opened (reason): training goes on, its tracking spooled."""
    return _spooled(read_plan(Path(plan_file)), reason, tags=_prefect_tags(flow_run_id))


def _spooled(run_plan: RunPlan, reason: str, *, tags: dict[str, str]) -> str | None:
    """Training goes on without the server: the run's recorded MLflow run (a resume: the metrics buffer keeps what
    it cannot send), else none yet, the uploads noted as owed (tracking.spool)."""
    run_id = tracking.recorded_run_id(run_plan.run_dir)
    if run_id is None:
        spool.record_pending_uploads(run_plan.run_dir, reason, spooled_tags=tags)
    get_run_logger().warning(
        "%s: training goes on with tracking spooled in %s; once the server is back, `wmtp upload %s` sends it",
        reason,
        run_plan.run_dir,
        run_plan.recipe.run.name,
    )
    return run_id


def _prefect_tags(flow_run_id: str | None) -> dict[str, str]:
    tags = {"prefect.flow_run_id": flow_run_id} if flow_run_id else {}
    # The MLflow run links back to the Prefect run where Prefect has a UI: without one, flow_run.ui_url is
    # "None/flow-runs/...".
    if flow_run_id and PREFECT_UI_URL.value():
        tags["prefect.flow_run_url"] = flow_run.ui_url
    return tags


@task(name="open_spooled_run", cache_policy=NO_CACHE)
def open_spooled_run(run_dir: str) -> str | None:
    """The catch-up at the end of a run whose tracking was spooled: its MLflow run, opened now if the server is
    back (the upload then sends everything), else None (the uploads stay owed)."""
    if spool.unreachable_reason(tracking.tracking_uri()):
        return None
    run_id = tracking.open_spooled_run(Path(run_dir))
    get_run_logger().info("tracking server reachable again: MLflow run %s opened for the spooled run", run_id)
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
    return artifacts.upload_run(
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
    spool.record_pending_uploads(Path(summary.run_dir), reason)
    summary = summary.model_copy(update={"uploads": "pending", "uploads_reason": reason})
    summary.write()
    get_run_logger().warning(
        "uploads to MLflow failed (%s); they are pending: run `wmtp upload %s`", reason, summary.run_name
    )
    return summary
