"""Flow `wmtp-train`: probe the environment, prepare the run, train (retries resume), upload to MLflow, summarise."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Failed, State

from tasks.environment import probe_environment
from tasks.reporting import publish_summary
from tasks.run_setup import prepare_run
from tasks.tracking import run_link
from tasks.training import train_model
from tasks.upload import open_tracking_run, record_pending_uploads, upload_artifacts
from wmtp_core.config import PhaseGates, Recipe, with_run_name
from wmtp_core.manifest import latest_valid_checkpoint


@flow(name="wmtp-train")
def wmtp_train(recipe: Recipe = Recipe(), phases: PhaseGates | None = None, resume: bool = False) -> dict | State:
    """Train a WMTP model, checkpointing as it goes, and upload the checkpoints and a summary to MLflow.

    Args:
        recipe: The whole run description (model, data, training, tracking, phase gates).
        phases: Fix-plan gates for this run; when set they replace recipe.phases.
        resume: Continue the run named recipe.run.name from its newest valid checkpoint.
    """
    if phases is not None:
        recipe = recipe.model_copy(update={"phases": phases})
    probe = probe_environment()
    run = prepare_run(recipe, resume=resume)
    recipe = with_run_name(recipe, run["run_name"])
    mlflow_run_id = open_tracking_run(recipe, run["run_dir"], run_name=run["run_name"], flow_run_id=flow_run.id, probe=probe)
    training = train_model(recipe, run["run_dir"], probe=probe, mlflow_run_id=mlflow_run_id, return_state=True)
    summary = build_summary(recipe, run, training, mlflow_run_id=mlflow_run_id)
    upload = upload_artifacts(run["run_dir"], summary, mlflow_run_id=mlflow_run_id, return_state=True)
    if upload.is_failed():
        if not recipe.phases.api:
            return Failed(message=f"upload to MLflow failed (phases.api off): {_one_line(upload)}")
        summary = record_pending_uploads(run["run_dir"], summary, reason=_one_line(upload))
    publish_summary(summary)
    if summary["status"] != "completed":
        return Failed(message=summary["reason"])
    return summary


def build_summary(recipe: Recipe, run: dict, training: State, *, mlflow_run_id: str | None) -> dict:
    """The run summary: training figures on success, a one-line reason and the newest checkpoint on failure."""
    summary = {"run_name": run["run_name"], "run_dir": run["run_dir"], "mlflow_run_id": mlflow_run_id,
               "mlflow_link": run_link(Path(run["run_dir"])) if mlflow_run_id else None}
    if training.is_completed():
        result = training.result()
        summary.update(status="completed", reason=None, **result)
    else:
        latest = latest_valid_checkpoint(Path(run["run_dir"]))
        summary.update(
            status="failed",
            reason=_one_line(training),
            steps=latest.step if latest else 0,
            initial_eval_loss=None,
            final_eval_loss=None,
            latest_checkpoint=str(latest.path) if latest else None,
        )
    summary["phases"] = recipe.phases.model_dump()
    summary["uploads"] = "done" if mlflow_run_id else "tracking off"
    return summary


def _one_line(state: State) -> str:
    """The exception behind a failed task state, as 'Type: message' on one line."""
    error = state.result(raise_on_failure=False)
    return f"{type(error).__name__}: {error}".splitlines()[0]
