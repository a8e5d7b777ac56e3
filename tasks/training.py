"""Tasks: the brief rho1 reference and the main training, each a whole training loop in one task run (one task per
batch would leak Prefect state objects), in this process or under torchrun."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.progress import TrainingProgress
from tasks.torchrun import WorkerInterrupted, needs_torchrun, run_torchrun, torchrun_command
from tasks.tracking import metrics_sink
from wmtp_core.algorithms.brief_reference import brief_reference_dir, brief_reference_recipe, finished_brief_reference
from wmtp_core.checkpoint.manifest import CheckpointError, Verdicts, latest_valid_checkpoint
from wmtp_core.config import Recipe, RecipeError
from wmtp_core.fixplan.gates import tracking_policy
from wmtp_core.recipes import recipe_to_yaml
from wmtp_core.runtime.run_lock import RunLockedError, run_lock
from wmtp_core.runtime.stopping import TrainingInterrupted

# Errors a retry cannot fix: bad input, a deterministic legacy-path failure, a run held by another trainer, or
# a SIGTERM (the run is being cancelled; the scheduled resume deployment picks it up later).
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
def train_reference(recipe: Recipe, run_dir: str, *, probe: dict) -> str:
    """rho1-wmtp with no reference named: train the run's model for rho1.reference_steps baseline steps into
    <run_dir>/reference (an attempt or a later run resumes what was saved); returns the reference checkpoint."""
    logger = get_run_logger()
    done = finished_brief_reference(recipe, Path(run_dir))
    if done is not None:
        logger.info("rho1-wmtp: reusing the brief reference at %s", done.path)
        return str(done.path)
    logger.warning(
        "rho1-wmtp: no rho1.reference_checkpoint or rho1.reference_hf_model given, so the run's own model is "
        "trained for %d baseline steps as the reference; set one of them to use a real one",
        recipe.rho1.reference_steps,
    )
    reference = brief_reference_recipe(recipe)
    directory = brief_reference_dir(Path(run_dir))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "recipe.yaml").write_text(recipe_to_yaml(reference))
    result = train_in_run_dir(reference, directory, probe=probe, mlflow_run_id=None, progress_name=reference.run.name)
    return result["latest_checkpoint"]


@task(
    name="train",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_invalid_input,
    cache_policy=NO_CACHE,
)
def train_model(
    recipe: Recipe,
    run_dir: str,
    *,
    probe: dict,
    mlflow_run_id: str | None,
    time_budget_s: float | None = None,
    start_from: str | None = None,
    verdicts: Verdicts | None = None,
) -> dict:
    """Train to recipe.train.max_steps; an attempt (or retry) resumes from the newest valid checkpoint of the run,
    or from start_from (another run's checkpoint, verified) while the run has none of its own. verdicts: what
    prepare_run found of the run's checkpoints, so the one it verified is not hashed again."""
    return train_in_run_dir(
        recipe,
        Path(run_dir),
        probe=probe,
        mlflow_run_id=mlflow_run_id,
        time_budget_s=time_budget_s,
        start_from=Path(start_from) if start_from else None,
        progress_name=Path(run_dir).name,
        verdicts=verdicts,
    )


def train_in_run_dir(
    recipe: Recipe,
    directory: Path,
    *,
    probe: dict,
    mlflow_run_id: str | None,
    progress_name: str,
    time_budget_s: float | None = None,
    start_from: Path | None = None,
    verdicts: Verdicts | None = None,
) -> dict:
    """Hold the run's lock, resume from its newest valid checkpoint (else start_from, verified by the caller), and
    train: one process here, more (devices.nproc_per_node or devices.nnodes above 1) under torchrun. The checkpoint
    is hashed here at most once (not at all when verdicts has it) and never again by the training processes.
    Returns the TrainResult."""
    logger = get_run_logger()
    for name in ("wmtp_core", "tasks"):
        logging.getLogger(name).setLevel(logging.INFO)
    with run_lock(directory):
        latest = latest_valid_checkpoint(directory, verdicts=dict(verdicts or {}))
        if latest is not None:
            logger.info("resuming from %s (step %d)", latest.path, latest.step)
        elif start_from is not None:
            logger.info("starting from %s", start_from)
        resume = latest.path if latest else start_from
        safe = tracking_policy(recipe.phases).never_stops_training
        sink = metrics_sink(mlflow_run_id, directory, safe=safe) if mlflow_run_id else None
        start = latest.step if latest else 0
        progress = TrainingProgress(progress_name, max_steps=recipe.train.max_steps, start_step=start)
        report = progress.reporting_to(sink)  # MLflow metrics, then the Prefect progress artifact
        extra = {"tracking_run_id": mlflow_run_id}
        recipe = _with_device_profile(recipe, probe)
        try:
            if needs_torchrun(recipe):
                return progress.finish(_train_under_torchrun(recipe, directory, resume, report, extra, time_budget_s))
            return progress.finish(_train_here(recipe, directory, probe, resume, report, extra, time_budget_s))
        finally:
            if sink is not None:
                sink.close()


def _with_device_profile(recipe: Recipe, probe: dict) -> Recipe:
    """The recipe as the device policy adjusts it (the MPS profile), decided before choosing one process or torchrun."""
    from wmtp_core.fixplan.gates import resolve_gates
    from wmtp_core.runtime.devices import EnvironmentProbe  # torch loads here, not at flow import

    gates = resolve_gates(recipe)
    plan = gates.plan_devices(recipe.devices, recipe.data, EnvironmentProbe(**probe))
    recipe, reasons = gates.apply_device_profile(recipe, plan)
    for reason in reasons:
        get_run_logger().info("%s", reason)
    return recipe


def _train_under_torchrun(recipe, directory, resume, report, extra, time_budget_s) -> dict:
    result_file = directory / "torchrun_result.json"
    command = torchrun_command(
        recipe,
        directory,
        resume=resume,
        resume_verified=True,  # train_in_run_dir verified it (or holds its verdict)
        result_file=result_file,
        manifest_extra=extra,
        time_budget_s=time_budget_s,
    )
    return run_torchrun(
        command,
        result_file=result_file,
        silence_timeout_s=recipe.devices.timeout_s,
        log=get_run_logger(),
        on_metrics=report,
    )


def _train_here(recipe, directory, probe, resume, report, extra, time_budget_s) -> dict:
    from wmtp_core.fixplan.gates import plan_run_devices
    from wmtp_core.runtime.devices import EnvironmentProbe
    from wmtp_core.training.loop import train

    plan = plan_run_devices(recipe, EnvironmentProbe(**probe))
    result = train(
        recipe,
        directory,
        plan=plan,
        resume_from=resume,
        resume_verified=True,  # train_in_run_dir verified it (or holds its verdict)
        on_metrics=report,
        manifest_extra=extra,
        time_budget_s=time_budget_s,
    )
    return asdict(result)
