"""Flow `wmtp-train`: probe the environment, prepare the run, train the brief rho1 reference when one is needed,
train (retries resume), evaluate the final checkpoint when asked, upload to MLflow, summarise."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.evaluate import evaluate_run
from flows.parameters import ResumeFrom
from tasks.environment import probe_environment
from tasks.reporting import publish_checkpoints, publish_summary
from tasks.run_setup import prepare_run
from tasks.tracking import run_link
from tasks.training import train_model, train_reference
from tasks.upload import open_tracking_run, record_pending_uploads, upload_artifacts
from wmtp_core.algorithms.brief_reference import needs_brief_reference
from wmtp_core.checkpoint.manifest import Verdicts, latest_valid_checkpoint
from wmtp_core.config import PhaseGates, Recipe, with_run_name
from wmtp_core.fixplan.gates import tracking_policy


def train_flow_run_name() -> str:
    """`train-<run>` for a new run, `resume-<run>` when the resume parameter continues one (Prefect calls this
    with the run's parameters in prefect.runtime; the recipe is a dict when it comes from the API)."""
    parameters = flow_run.parameters
    recipe = parameters.get("recipe")
    run = recipe.get("run", {}) if isinstance(recipe, dict) else getattr(recipe, "run", None)
    name = run.get("name") if isinstance(run, dict) else getattr(run, "name", None)
    verb = "resume" if parameters.get("resume") not in (None, "") else "train"
    return f"{verb}-{name or 'new-run'}"


@flow(name="wmtp-train", flow_run_name=train_flow_run_name)
def wmtp_train(
    recipe: Recipe = Recipe(),
    phases: PhaseGates | None = None,
    resume: ResumeFrom | None = None,
    evaluate: bool | None = None,
) -> dict | State:
    """Train a WMTP model, checkpointing as it goes, and upload the checkpoints and a summary to MLflow.

    Args:
        recipe: The whole run description (model, data, training, tracking, phase gates).
        phases: Fix-plan gates for this run; when set they replace recipe.phases.
        resume: Empty for a new run; else where run recipe.run.name continues: `latest` (its newest valid
            checkpoint), one of its steps, or a checkpoint directory (of any run) to start it from.
        evaluate: Evaluate the final checkpoint after training (recipe.evaluation says how); empty follows
            recipe.evaluation.enabled.
    """
    if phases is not None:
        recipe = recipe.model_copy(update={"phases": phases})
    if evaluate is not None:
        recipe = recipe.model_copy(update={"evaluation": recipe.evaluation.model_copy(update={"enabled": evaluate})})
    return train_and_upload(recipe, resume=resume)


def train_and_upload(
    recipe: Recipe,
    *,
    resume: ResumeFrom | None,
    time_budget_s: float | None = None,
    verdicts: Verdicts | None = None,
) -> dict | State:
    """The body of wmtp-train and wmtp-resume: probe, prepare, train (retries resume), upload, publish the artifacts.

    The checkpoint a resume starts from is verified once (by the caller, which passes its verdicts, or by
    prepare_run); its verdict and those of the checkpoints training saves travel on, so no task hashes them again.
    """
    probe = probe_environment()
    run = prepare_run(recipe, resume=resume, verdicts=verdicts)
    recipe = with_run_name(recipe, run["run_name"])
    mlflow_run_id = open_tracking_run(
        recipe, run["run_dir"], run_name=run["run_name"], flow_run_id=flow_run.id, probe=probe
    )
    training = None
    if needs_brief_reference(recipe):
        training = train_reference(recipe, run["run_dir"], probe=probe, return_state=True)
    if training is None or training.is_completed():
        training = train_model(
            recipe,
            run["run_dir"],
            probe=probe,
            mlflow_run_id=mlflow_run_id,
            time_budget_s=time_budget_s,
            start_from=run["start_checkpoint"],
            verdicts=run["verdicts"],
            return_state=True,
        )
    verdicts = {**run["verdicts"], **saved_by(training)}
    summary = build_summary(recipe, run, training, mlflow_run_id=mlflow_run_id, verdicts=verdicts)
    if recipe.evaluation.enabled and summary["status"] == "completed":
        summary["evaluation"] = evaluate_after_training(recipe, run, summary["latest_checkpoint"])
    upload = upload_artifacts(
        run["run_dir"], summary, mlflow_run_id=mlflow_run_id, verdicts=verdicts, return_state=True
    )
    if upload.is_failed():
        if not tracking_policy(recipe.phases).never_stops_training:
            return Failed(message=f"upload to MLflow failed (phases.api off): {_one_line(upload)}")
        summary = record_pending_uploads(run["run_dir"], summary, reason=_one_line(upload))
    publish_summary(summary)
    publish_checkpoints(run["run_name"], run["run_dir"])
    if summary["status"] == "stopped":
        return Completed(
            message=f"stopped by {stopped_by(summary['stop_reason'])} at step {summary['steps']} of "
            f"{recipe.train.max_steps}; checkpoint {summary['latest_checkpoint']}",
            data=summary,
        )
    if summary["status"] != "completed":
        return Failed(message=summary["reason"])
    return summary


def evaluate_after_training(recipe: Recipe, run: dict, checkpoint: str) -> dict:
    """pass@k of the final checkpoint (its figures also go to MLflow and the flow run's artifacts). A failed
    evaluation does not fail the trained run: `wmtp evaluate RUN` repeats it."""
    try:
        report = evaluate_run(run["run_name"], run["run_dir"], checkpoint, evaluation=recipe.evaluation)
    except Exception as error:
        get_run_logger().warning("evaluation failed (the run is kept; repeat it with `wmtp evaluate`): %s", error)
        return {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    return {"benchmark": report["benchmark"], "pass_at_k": report["pass_at_k"], "directory": report["directory"]}


def stopped_by(stop_reason: str) -> str:
    """'the time budget', 'Ctrl-C' or 'the SIGTERM': what stopped a run early, for a sentence."""
    return stop_reason if stop_reason == "Ctrl-C" else f"the {stop_reason}"


def saved_by(training: State) -> Verdicts:
    """The checkpoints a completed training task saved, each valid (hashed while it was written)."""
    result = training.result() if training.is_completed() else {}
    return {path: None for path in result.get("saved_checkpoints", ())}


def build_summary(
    recipe: Recipe, run: dict, training: State, *, mlflow_run_id: str | None, verdicts: Verdicts | None = None
) -> dict:
    """The run summary: training figures when training returned (status completed, or stopped early by a time budget),
    a one-line reason and the newest checkpoint on failure (verdicts: checkpoints not to hash again)."""
    summary = {
        "run_name": run["run_name"],
        "run_dir": run["run_dir"],
        "mlflow_run_id": mlflow_run_id,
        "mlflow_link": run_link(Path(run["run_dir"])) if mlflow_run_id else None,
    }
    if training.is_completed():
        result = training.result()
        figures = {key: value for key, value in result.items() if key != "saved_checkpoints"}
        summary.update(status="stopped" if result.get("stop_reason") else "completed", reason=None, **figures)
    else:
        latest = latest_valid_checkpoint(Path(run["run_dir"]), verdicts=dict(verdicts or {}))
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
