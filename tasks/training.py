"""Task: the whole training loop in one task run (one task per batch would leak Prefect state objects)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import metrics_sink
from wmtp_core.config import Recipe, RecipeError
from wmtp_core.manifest import CheckpointError, latest_valid_checkpoint

# Errors a retry cannot fix: bad input or a deterministic legacy-path failure.
NOT_RETRIED = (RecipeError, ValueError, CheckpointError, FileNotFoundError)


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
def train_model(recipe: Recipe, run_dir: str, *, probe: dict, mlflow_run_id: str | None) -> dict:
    """Train to recipe.train.max_steps; an attempt (or retry) resumes from the newest valid checkpoint."""
    from wmtp_core.device import EnvironmentProbe, plan_devices  # torch loads here, not at flow import
    from wmtp_core.training import train

    logger = get_run_logger()
    for name in ("wmtp_core", "tasks"):
        logging.getLogger(name).setLevel(logging.INFO)
    plan = plan_devices(recipe.devices, recipe.data, recipe.phases, EnvironmentProbe(**probe))
    logger.info("device plan: %s", "; ".join(plan.reasons))
    latest = latest_valid_checkpoint(Path(run_dir))
    if latest is not None:
        logger.info("resuming from %s (step %d)", latest.path, latest.step)
    sink = metrics_sink(mlflow_run_id, Path(run_dir), safe=recipe.phases.api) if mlflow_run_id else None
    try:
        result = train(recipe, Path(run_dir), plan=plan, resume_from=latest.path if latest else None,
                       on_metrics=sink, manifest_extra={"tracking_run_id": mlflow_run_id})
    finally:
        if sink is not None:
            sink.close()
    return asdict(result)
