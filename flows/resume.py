"""Flow `wmtp-resume`: continue a run from its newest valid checkpoint (what the scheduled deployment runs).

A run already at its target finishes at once (Completed, with a message); a run without a checkpoint fails with
one that says so. Otherwise it trains and uploads exactly as `wmtp-train` does, optionally within a time budget.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed, State

from flows.parameters import BudgetMinutes, RunName, TargetSteps
from flows.train import train_and_upload
from tasks.locations import run_dir
from wmtp_core.checkpoint.manifest import latest_valid_checkpoint
from wmtp_core.recipes import load_recipe


@flow(name="wmtp-resume", flow_run_name="resume-{run_name}")
def wmtp_resume(
    run_name: RunName, target_steps: TargetSteps | None = None, budget_minutes: BudgetMinutes | None = None
) -> dict | State:
    """Continue a WMTP run from its newest valid checkpoint, then upload to MLflow like wmtp-train.

    Args:
        run_name: The run to continue (a directory under $WMTP_HOME/runs).
        target_steps: Optimizer steps to reach; empty keeps the run's own train.max_steps.
        budget_minutes: Wall-clock minutes this invocation may train; it then saves a checkpoint and stops, and the
            next invocation continues. Empty trains to the target.
    """
    directory = run_dir(run_name)
    verdicts = {}  # the newest checkpoint is verified here, once: prepare_run and the tasks after it get this verdict
    latest = latest_valid_checkpoint(directory, verdicts=verdicts)
    if latest is None:
        return Failed(
            message=f"run {run_name!r} has no valid checkpoint in {directory / 'checkpoints'} to resume from; "
            "start it with wmtp-train (`wmtp checkpoints RUN` shows what is there)"
        )
    overrides = [f"train.max_steps={target_steps}"] if target_steps is not None else []
    recipe = load_recipe(directory / "recipe.yaml", overrides)
    if latest.step >= recipe.train.max_steps:
        message = (
            f"run {run_name!r} is already complete: step {latest.step} of {recipe.train.max_steps}; nothing to train"
        )
        get_run_logger().info(message)
        return Completed(message=message)
    get_run_logger().info("run %s: step %d -> %d", run_name, latest.step, recipe.train.max_steps)
    budget_s = budget_minutes * 60 if budget_minutes else None
    return train_and_upload(recipe, resume="latest", time_budget_s=budget_s, verdicts=verdicts)
