"""Training in the test process the way a flow run does it: plan the run (wmtp_core.run.plan), write the plan, train."""

from __future__ import annotations

from pathlib import Path

from wmtp_core.config import Recipe
from wmtp_core.run.plan import plan_devices, plan_run, write_plan
from wmtp_core.runtime.device_plan import DevicePlan, EnvironmentProbe
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.training.loop import TrainResult, train


def plan_and_train(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume_from: Path | None = None,
    time_budget_s: float | None = None,
    devices: DevicePlan | None = None,
    **train_options,
) -> TrainResult:
    """Plan recipe's run in run_dir (from resume_from, a checkpoint directory, when given) and train it here.
    devices replaces the plan's device plan (a test's own, e.g. bf16 autocast on the CPU)."""
    planned = plan_run(recipe, resume=resume_from, directory=Path(run_dir), time_budget_s=time_budget_s)
    write_plan(planned)
    run_plan = planned.plan if devices is None else planned.plan.model_copy(update={"devices": devices})
    return train(run_plan, **train_options)


def device_plan(recipe: Recipe, probe: EnvironmentProbe | None = None) -> DevicePlan:
    """The device plan the run planner gives recipe on probe (default: this machine)."""
    return plan_devices(recipe, probe or probe_environment())[2]
