"""Task: plan the run (wmtp_core.run.plan): its name and directory, gates, devices, data and start checkpoint,
decided once for the flow run and written to <run>/plan.json before anything trains."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from wmtp_core.config import Recipe
from wmtp_core.run.plan import RunPlan, plan_run, write_plan
from wmtp_core.run.start import At
from wmtp_core.runtime.device_plan import EnvironmentProbe


@task(name="plan_run", cache_policy=NO_CACHE)
def make_run_plan(recipe: Recipe, *, resume: At, probe: dict, time_budget_s: float | None = None) -> str:
    """Plan the run and write its plan; returns the plan file's path (what the tasks after this one read).

    A fresh run (resume None) refuses a name that already has checkpoints; a resume needs the checkpoint it names,
    which is verified here, once for the whole flow run.
    """
    planned = plan_run(recipe, resume=resume, probe=EnvironmentProbe(**probe), time_budget_s=time_budget_s)
    path = write_plan(planned)
    log_plan(planned.plan)
    return str(path)


def log_plan(plan: RunPlan) -> None:
    """The plan's decisions in the flow run's log, one line each."""
    logger = get_run_logger()
    logger.info("run %s in %s (%s)", plan.recipe.run.name, plan.run_dir, plan.start.describe())
    logger.info("launcher: %s; gates: %s", plan.launcher, plan.gates.model_dump())
