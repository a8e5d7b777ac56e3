"""Task: the whole training loop in one task run (one task per batch would leak Prefect state objects)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.progress import TrainingProgress
from tasks.torchrun import WorkerInterrupted, needs_torchrun, run_torchrun, torchrun_command
from tasks.tracking import metrics_sink
from wmtp_core.config import Recipe, RecipeError
from wmtp_core.manifest import CheckpointError, latest_valid_checkpoint
from wmtp_core.run_lock import RunLockedError, run_lock
from wmtp_core.stopping import TrainingInterrupted

# Errors a retry cannot fix: bad input, a deterministic legacy-path failure, a run held by another trainer, or
# a SIGTERM (the run is being cancelled; the scheduled resume deployment picks it up later).
NOT_RETRIED = (RecipeError, ValueError, CheckpointError, FileNotFoundError, RunLockedError, TrainingInterrupted,
               WorkerInterrupted)


def retry_unless_invalid_input(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry crashes and transient errors, never invalid input."""
    try:
        state.result()
    except NOT_RETRIED:
        return False
    except Exception:
        return True
    return False


@task(name="train", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_invalid_input, cache_policy=NO_CACHE)
def train_model(recipe: Recipe, run_dir: str, *, probe: dict, mlflow_run_id: str | None,
                time_budget_s: float | None = None, start_from: str | None = None) -> dict:
    """Train to recipe.train.max_steps; an attempt (or retry) resumes from the newest valid checkpoint of the run,
    or from start_from (another run's checkpoint) while the run has none of its own.

    One process trains here; more (devices.nproc_per_node or devices.nnodes above 1) run under torchrun.
    """
    logger = get_run_logger()
    for name in ("wmtp_core", "tasks"):
        logging.getLogger(name).setLevel(logging.INFO)
    directory = Path(run_dir)
    with run_lock(directory):
        latest = latest_valid_checkpoint(directory)
        if latest is not None:
            logger.info("resuming from %s (step %d)", latest.path, latest.step)
        elif start_from is not None:
            logger.info("starting from %s", start_from)
        resume = latest.path if latest else (Path(start_from) if start_from else None)
        sink = metrics_sink(mlflow_run_id, directory, safe=recipe.phases.api) if mlflow_run_id else None
        progress = TrainingProgress(directory.name, max_steps=recipe.train.max_steps, start_step=latest.step if latest else 0)
        report = progress.reporting_to(sink)  # MLflow metrics, then the Prefect progress artifact
        extra = {"tracking_run_id": mlflow_run_id}
        recipe = _with_device_profile(recipe, probe)
        try:
            if needs_torchrun(recipe):
                command = torchrun_command(recipe, directory, resume=resume,
                                           result_file=directory / "torchrun_result.json", manifest_extra=extra,
                                           time_budget_s=time_budget_s)
                return progress.finish(run_torchrun(command, result_file=directory / "torchrun_result.json",
                                                    silence_timeout_s=recipe.devices.timeout_s, log=logger, on_metrics=report))
            return progress.finish(_train_here(recipe, directory, probe=probe, resume=resume, on_metrics=report,
                                               manifest_extra=extra, time_budget_s=time_budget_s))
        finally:
            if sink is not None:
                sink.close()


def _with_device_profile(recipe: Recipe, probe: dict) -> Recipe:
    """The recipe as the device policy adjusts it (the MPS profile), decided before choosing one process or torchrun."""
    from wmtp_core.device import EnvironmentProbe, apply_device_profile, plan_devices

    plan = plan_devices(recipe.devices, recipe.data, recipe.phases, EnvironmentProbe(**probe))
    recipe, reasons = apply_device_profile(recipe, plan)
    for reason in reasons:
        get_run_logger().info("%s", reason)
    return recipe


def _train_here(recipe: Recipe, run_dir: Path, *, probe: dict, resume: Path | None, on_metrics, manifest_extra: dict,
                time_budget_s: float | None) -> dict:
    from wmtp_core.device import EnvironmentProbe, plan_devices  # torch loads here, not at flow import
    from wmtp_core.training import train

    plan = plan_devices(recipe.devices, recipe.data, recipe.phases, EnvironmentProbe(**probe))
    result = train(recipe, run_dir, plan=plan, resume_from=resume, on_metrics=on_metrics,
                   manifest_extra=manifest_extra, time_budget_s=time_budget_s)
    return asdict(result)
