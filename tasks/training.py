"""Tasks: the brief rho1 reference and the main training, each a whole training loop in one task run (one task per
batch would leak Prefect state objects), in this process or under torchrun."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from tasks.reporting import TrainingProgress
from tracking.client import metrics_sink
from wmtp_core.checkpoint.manifest import CheckpointError
from wmtp_core.checkpoint.save_dirs import remove_save_debris
from wmtp_core.config import RecipeError
from wmtp_core.launch.torchrun import WorkerInterrupted, run_job, worker_command
from wmtp_core.recipes import recipe_to_yaml
from wmtp_core.run.plan import RunPlan, read_plan, restarted, save_plan
from wmtp_core.run.start import choose_checkpoint
from wmtp_core.runtime.run_lock import RunLockedError, run_lock
from wmtp_core.runtime.stopping import TrainingInterrupted

# Errors a retry cannot fix: bad input, a deterministic legacy-path failure, a run held by another trainer, or
# a SIGTERM (the run is being stopped: train_model returns it as a stopped run; the rho1 reference fails with it).
NOT_RETRIED = (
    RecipeError,
    ValueError,
    CheckpointError,
    FileNotFoundError,
    RunLockedError,
    TrainingInterrupted,
    WorkerInterrupted,
)


def retry_unless_invalid_input(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry crashes and transient errors, never invalid input."""
    try:
        state.result()
    except NOT_RETRIED:
        return False
    except Exception:
        return True
    return False


@task(
    name="train_reference",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_invalid_input,
    cache_policy=NO_CACHE,
)
def train_reference(plan_file: str) -> str:
    """rho1-wmtp with no reference named: train the run's model for rho1.reference_steps baseline steps into
    <run>/reference, as the run plan's reference_run plans it (an attempt or a later run resumes what was saved);
    returns the reference checkpoint, the one the run plan names."""
    logger = get_run_logger()
    run_plan = read_plan(Path(plan_file))
    reference = run_plan.reference_run
    if reference.finished:
        logger.info("rho1-wmtp: reusing the brief reference at %s", run_plan.reference)
        return str(run_plan.reference)
    logger.warning(
        "rho1-wmtp: no rho1.reference_checkpoint or rho1.reference_hf_model given, so the run's own model is "
        "trained for %d baseline steps as the reference; set one of them to use a real one",
        reference.recipe.train.max_steps,
    )
    reference.layout.recipe.write_text(recipe_to_yaml(reference.recipe))
    train_planned(reference.layout.plan, mlflow_run_id=None)
    return str(run_plan.reference)


@task(
    name="train",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_invalid_input,
    cache_policy=NO_CACHE,
)
def train_model(plan_file: str, *, mlflow_run_id: str | None) -> dict:
    """Train as the run plan says, to recipe.train.max_steps; a retry resumes from the newest valid checkpoint. A
    SIGTERM (a preemption, `timeout`, a Prefect cancellation) ends it as a stopped run, as Ctrl-C does: every process
    saved a checkpoint at the step it reached, and the flow summarises and reports the run before its process exits."""
    try:
        return train_planned(Path(plan_file), mlflow_run_id=mlflow_run_id)
    except (TrainingInterrupted, WorkerInterrupted) as stopped:
        get_run_logger().warning("%s", stopped)
        # In this process only SIGTERM raises; a torchrun job's says which signal stopped it (Ctrl-C too).
        reason = stopped.reason if isinstance(stopped, WorkerInterrupted) else "SIGTERM"
        return stopped_result(read_plan(Path(plan_file)), reason)


def stopped_result(run_plan: RunPlan, reason: str) -> dict:
    """The training result of a run that a signal stopped: the newest valid checkpoint (the one saved at the stop)
    is where it reached. Its figures stay with the processes that trained; the flow needs the step and checkpoint."""
    latest = choose_checkpoint(run_plan.layout, "latest", continuing=False, fresh_if_none=True)
    resumed_from = None if run_plan.start.fresh else run_plan.start.step
    saved = () if latest.fresh else (str(latest.checkpoint),)  # verified just now: not hashed again
    return {
        "steps": latest.step,
        "latest_checkpoint": str(latest.checkpoint) if saved else None,
        "resumed_from_step": resumed_from,
        "stop_reason": reason,
        "saved_checkpoints": saved,
    }


def train_planned(plan_file: Path, *, mlflow_run_id: str | None) -> dict:
    """Hold the run's lock and execute its plan: one process here, more under torchrun or on a Ray cluster. A retry
    of the task (or a Prefect retry after the job failed) starts from the newest valid checkpoint instead of the
    plan's start: the failed attempt may have saved since. Returns the TrainResult as a dict."""
    logger = get_run_logger()
    for name in ("wmtp_core", "tasks"):
        logging.getLogger(name).setLevel(logging.INFO)
    run_plan = read_plan(plan_file)
    with run_lock(run_plan.run_dir):
        remove_save_debris(run_plan.run_dir)  # killed saves' directories: no writer of this run is alive now
        if task_run.run_count > 1:
            run_plan = restarted(run_plan)
            save_plan(run_plan)
        if not run_plan.start.fresh:
            logger.info("resuming from %s (step %d)", run_plan.start.checkpoint, run_plan.start.step)
        safe = run_plan.gates.tracking_never_stops_training
        sink = metrics_sink(mlflow_run_id, run_plan.run_dir, safe=safe)  # None: no MLflow run, nothing spooled
        recipe = run_plan.recipe
        progress = TrainingProgress(recipe.run.name, max_steps=recipe.train.max_steps, start_step=run_plan.start.step)
        report = progress.reporting_to(sink)  # MLflow metrics, then the Prefect progress artifact
        extra = {"tracking_run_id": mlflow_run_id}
        try:
            if run_plan.launcher in ("torchrun", "ray"):
                return progress.finish(_train_as_job(run_plan, plan_file, report, extra))
            return progress.finish(_train_here(run_plan, report, extra))
        finally:
            if sink is not None:
                sink.close()


def _train_as_job(run_plan: RunPlan, plan_file: Path, report, extra: dict) -> dict:
    """Under torchrun on this node, or a Ray job's driver (wmtp_core.launch.ray_job) for the cluster's workers."""
    layout = run_plan.layout
    result_file = layout.ray_result if run_plan.launcher == "ray" else layout.torchrun_result
    return run_job(
        worker_command(run_plan, plan_file, result_file=result_file, manifest_extra=extra),
        result_file=result_file,
        silence_timeout_s=run_plan.recipe.devices.timeout_s,
        log=get_run_logger(),
        on_metrics=report,
    )


def _train_here(run_plan: RunPlan, report, extra: dict) -> dict:
    from wmtp_core.training.loop import train  # torch loads here, not at flow import

    return asdict(train(run_plan, on_metrics=report, manifest_extra=extra))
