"""Flow `wmtp-resume`: continue a run from its newest valid checkpoint (what the scheduled deployment runs).

A run already at its target finishes at once (Completed, with a message); a run without a checkpoint fails with
one that says so, and so does a run another process is training (left untouched: flows.train.holding_the_run).
Otherwise it trains and uploads exactly as `wmtp-train` does, optionally within a time budget.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed, State

from flows.parameters import BudgetMinutes, RunName, TargetSteps
from flows.train import execute_plan, holding_the_run, one_line
from tasks.environment import probe_environment
from tasks.run_setup import make_run_plan
from wmtp_core.layout import RunLayout
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import read_plan


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
    layout = RunLayout.of_run(run_name)
    if not layout.recipe.is_file():
        return Failed(
            message=f"run {run_name!r} has no valid checkpoint to resume from (no such run in "
            f"{layout.root.parent}); start it with wmtp-train"
        )
    return holding_the_run(layout.root, lambda: resume_run(layout, target_steps, budget_minutes))


def resume_run(layout: RunLayout, target_steps: int | None, budget_minutes: float | None) -> dict | State:
    """Plan the resume (the run's recipe, target_steps and budget applied) and execute it, unless it is complete."""
    run_name = layout.name
    overrides = [f"train.max_steps={target_steps}"] if target_steps is not None else []
    recipe = load_recipe(layout.recipe, overrides)
    budget_s = budget_minutes * 60 if budget_minutes else None
    planning = make_run_plan(
        recipe, resume="latest", probe=probe_environment(recipe), time_budget_s=budget_s, return_state=True
    )
    if planning.is_failed():
        return Failed(
            message=f"{one_line(planning)}; start it with wmtp-train (`wmtp checkpoints RUN` shows what is there)"
        )
    plan_file = planning.result()
    run_plan = read_plan(Path(plan_file))
    if run_plan.finished:
        message = (
            f"run {run_name!r} is already complete: step {run_plan.start.step} of {recipe.train.max_steps}; "
            "nothing to train"
        )
        get_run_logger().info(message)
        return Completed(message=message)
    get_run_logger().info("run %s: step %d -> %d", run_name, run_plan.start.step, recipe.train.max_steps)
    return execute_plan(plan_file)
