"""Flow `wmtp-train`: probe the environment, plan the run (once: wmtp_core.run.plan), train the brief rho1
reference when the plan has one, train (retries resume), evaluate the final checkpoint when asked, upload to MLflow,
summarise."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.evaluate import evaluate_run
from flows.parameters import ResumeFrom
from tasks.environment import probe_environment
from tasks.reporting import publish_checkpoints, publish_summary
from tasks.run_setup import make_run_plan
from tasks.training import train_model, train_reference
from tasks.upload import (
    open_spooled_run,
    open_tracking_run,
    record_pending_uploads,
    spool_tracking,
    upload_artifacts,
)
from tracking.client import run_link
from tracking.spool import pending_uploads, tracking_spooled
from wmtp_core.checkpoint.manifest import Verdicts
from wmtp_core.config import PhaseGates, Recipe, generate_run_name, with_run_name
from wmtp_core.layout import run_dir
from wmtp_core.run.plan import RunPlan, read_plan
from wmtp_core.run.start import choose_checkpoint
from wmtp_core.run.summary import EvaluationOutcome, RunSummary
from wmtp_core.runtime.run_lock import RunLockedError, run_lock


def train_flow_run_name() -> str:
    """`train-<run>` for a new run, `resume-<run>` when it continues one (from its plan file, or from the resume
    parameter). Prefect calls this with the run's parameters in prefect.runtime; the recipe is a dict when it comes
    from the API."""
    parameters = flow_run.parameters
    if parameters.get("plan_file"):
        planned = read_plan(Path(parameters["plan_file"]))
        return f"{'train' if planned.start.fresh else 'resume'}-{planned.recipe.run.name}"
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
    plan_file: str | None = None,
) -> dict | State:
    """Train a WMTP model, checkpointing as it goes, and upload the checkpoints and a summary to MLflow.

    Args:
        recipe: The whole run description (model, data, training, tracking, phase gates).
        phases: Fix-plan gates for this run; when set they replace recipe.phases.
        resume: Empty for a new run; else where run recipe.run.name continues: `latest` (its newest valid
            checkpoint), one of its steps, or a checkpoint directory (of any run) to start it from.
        plan_file: A run plan already made (the `wmtp` CLI makes one before it starts this flow): executed as it
            is, and the parameters above must then be left at their defaults. Empty plans the run here.
    """
    if plan_file is not None:
        if (recipe, phases, resume) != (Recipe(), None, None):
            raise ValueError(
                "plan_file holds the recipe, gates and start point: leave recipe, phases and resume at their "
                "defaults, or leave plan_file empty"
            )
        return holding_the_run(read_plan(Path(plan_file)).run_dir, lambda: execute_plan(plan_file))
    if phases is not None:
        recipe = recipe.model_copy(update={"phases": phases})
    recipe = with_run_name(recipe, recipe.run.name or generate_run_name(recipe))  # named first: the lock is the run's
    return holding_the_run(
        run_dir(recipe.run.name),
        lambda: execute_plan(make_run_plan(recipe, resume=resume, probe=probe_environment(recipe))),
    )


def holding_the_run(directory: Path, body: Callable[[], dict | State]) -> dict | State:
    """body while this process holds the run's lock, taken before anything of the run is written (the CLI takes it
    before it writes the plan; this hold then nests in its own). While another process trains the run, the flow run
    fails at once with the holder named, and that run is left exactly as it was: no plan, recipe, summary, tracking
    file, MLflow run status or log of it is touched."""
    with ExitStack() as held:
        try:
            held.enter_context(run_lock(directory))
        except RunLockedError as refusal:
            get_run_logger().error("%s", refusal)
            return Failed(message=str(refusal))
        return body()


def execute_plan(plan_file: str) -> dict | State:
    """The body of wmtp-train and wmtp-resume once the run is planned: train the brief reference when the plan has
    one, train (retries resume), evaluate when asked, upload, publish the artifacts. Every task gets the plan file
    (or what it says): none decides anything about the run again."""
    run_plan = read_plan(Path(plan_file))
    recipe = run_plan.recipe
    mlflow_run_id = open_or_spool_tracking(run_plan, plan_file)
    training = None
    if run_plan.reference_run is not None:
        training = train_reference(plan_file, return_state=True)
    if training is None or training.is_completed():
        training = train_model(plan_file, mlflow_run_id=mlflow_run_id, return_state=True)
    if mlflow_run_id is None and tracking_spooled(run_plan.run_dir):
        mlflow_run_id = caught_up(run_plan)
    verdicts = {**_start_verdict(run_plan), **saved_by(training)}
    summary = build_summary(run_plan, training, mlflow_run_id=mlflow_run_id, verdicts=verdicts)
    if recipe.evaluation.enabled and summary.status == "completed":
        summary = summary.model_copy(
            update={"evaluation": evaluate_after_training(run_plan, summary.latest_checkpoint)}
        )
    upload = upload_artifacts(summary, verdicts=verdicts, return_state=True)
    if upload.is_failed():
        if not run_plan.gates.tracking_never_stops_training:
            return Failed(message=f"upload to MLflow failed (phases.api off): {one_line(upload)}")
        summary = record_pending_uploads(summary, reason=one_line(upload))
    publish_summary(summary)
    listed = training.result().get("checkpoints") if training.is_completed() else None
    publish_checkpoints(recipe.run.name, str(run_plan.run_dir), listed=listed)
    if summary.status == "stopped":
        return Completed(
            message=f"stopped by {stopped_by(summary.stop_reason)} at step {summary.steps} of "
            f"{recipe.train.max_steps}; checkpoint {summary.latest_checkpoint}",
            data=summary.model_dump(mode="json"),
        )
    if summary.status != "completed":
        return Failed(message=summary.reason)
    return summary.model_dump(mode="json")


def open_or_spool_tracking(run_plan: RunPlan, plan_file: str) -> str | None:
    """The run's MLflow run (None: tracking off or spooled). With phases.api on, a tracking server that is
    unreachable or failing at the start does not stop the run: its tracking is spooled (tracking.spool)."""
    opening = open_tracking_run(plan_file, flow_run_id=flow_run.id, return_state=True)
    if opening.is_completed() or not run_plan.gates.tracking_never_stops_training:
        return opening.result()  # the legacy path: a tracking error fails the flow run
    return spool_tracking(plan_file, reason=one_line(opening), flow_run_id=flow_run.id)


def caught_up(run_plan: RunPlan) -> str | None:
    """A spooled run's MLflow run, opened now that training is over if the server is back (the upload then sends
    everything); None while it is not, or failing: the uploads stay owed."""
    opening = open_spooled_run(str(run_plan.run_dir), return_state=True)
    return opening.result() if opening.is_completed() else None


def evaluate_after_training(run_plan: RunPlan, checkpoint: str) -> EvaluationOutcome:
    """pass@k of the final checkpoint (its figures also go to MLflow and the flow run's artifacts). A failed
    evaluation does not fail the trained run: `wmtp evaluate RUN` repeats it."""
    run_name, directory = run_plan.recipe.run.name, str(run_plan.run_dir)
    try:
        report = evaluate_run(run_name, directory, checkpoint, evaluation=run_plan.recipe.evaluation)
    except Exception as error:
        get_run_logger().warning("evaluation failed (the run is kept; repeat it with `wmtp evaluate`): %s", error)
        return EvaluationOutcome(error=f"{type(error).__name__}: {error}".splitlines()[0])
    return EvaluationOutcome(
        benchmark=report["benchmark"], pass_at_k=report["pass_at_k"], directory=report["directory"]
    )


def stopped_by(stop_reason: str) -> str:
    """'the time budget', 'Ctrl-C' or 'the SIGTERM': what stopped a run early, for a sentence."""
    return stop_reason if stop_reason == "Ctrl-C" else f"the {stop_reason}"


def saved_by(training: State) -> Verdicts:
    """The checkpoints a completed training task saved, each valid (hashed while it was written)."""
    result = training.result() if training.is_completed() else {}
    return {path: None for path in result.get("saved_checkpoints", ())}


def _start_verdict(run_plan: RunPlan) -> Verdicts:
    """The plan's start checkpoint was verified when it was chosen."""
    return {} if run_plan.start.fresh else {str(run_plan.start.checkpoint): None}


def build_summary(
    run_plan: RunPlan, training: State, *, mlflow_run_id: str | None, verdicts: Verdicts | None = None
) -> RunSummary:
    """The run summary: training figures when training returned (status completed, or stopped early by a time budget),
    a one-line reason and the newest checkpoint on failure (verdicts: checkpoints not to hash again)."""
    common = {
        "run_name": run_plan.recipe.run.name,
        "run_dir": str(run_plan.run_dir),
        "mlflow_run_id": mlflow_run_id,
        "mlflow_link": run_link(run_plan.run_dir) if mlflow_run_id else None,
        "phases": run_plan.recipe.phases,
        **uploads_owed(run_plan, mlflow_run_id),
    }
    if training.is_completed():
        result = training.result()
        figures = {key: value for key, value in result.items() if key not in ("saved_checkpoints", "checkpoints")}
        status = "stopped" if result.get("stop_reason") else "completed"
        return RunSummary(status=status, **figures, **common)
    latest = choose_checkpoint(
        run_plan.layout, "latest", continuing=False, fresh_if_none=True, verdicts=dict(verdicts or {})
    )
    return RunSummary(
        status="failed",
        reason=one_line(training),
        steps=latest.step,
        latest_checkpoint=None if latest.fresh else str(latest.checkpoint),
        **common,
    )


def uploads_owed(run_plan: RunPlan, mlflow_run_id: str | None) -> dict:
    """The summary's uploads fields before the upload: to do (an MLflow run), pending (tracking spooled, the server
    still unreachable: `wmtp upload` sends it), or tracking off."""
    if mlflow_run_id is not None:
        return {"uploads": "done"}
    if tracking_spooled(run_plan.run_dir):
        return {"uploads": "pending", "uploads_reason": pending_uploads(run_plan.run_dir)["reason"]}
    return {"uploads": "tracking off"}


def one_line(state: State) -> str:
    """The exception behind a failed task state, as 'Type: message' on one line."""
    error = state.result(raise_on_failure=False)
    return f"{type(error).__name__}: {error}".splitlines()[0]
