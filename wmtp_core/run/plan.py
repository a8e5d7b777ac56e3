"""The run plan: every decision about one flow run of a run, made once (plan_run), written into the run directory
(write_plan) and read by whatever executes it (read_plan): the training task, every torchrun rank, later every
remote worker. Nothing that reads a plan resolves gates, chooses a checkpoint, reads the user's data file or plans
devices again; each rank only finds its own device index.

Imports no torch at module level: Prefect tasks and the CLI read plans cheaply (planning itself loads torch to
probe the machine, unless it is given a probe).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from wmtp_core.config import Recipe, generate_run_name, with_run_name
from wmtp_core.data.records import builtin_dataset_path, parse_records, read_data_file
from wmtp_core.fixplan.gates import ResolvedGates, device_policies, resolve_gates
from wmtp_core.layout import RunLayout, run_dir
from wmtp_core.recipes import recipe_to_yaml
from wmtp_core.run.start import At, StartPoint, choose_checkpoint
from wmtp_core.runtime.atomic_files import write_atomically
from wmtp_core.runtime.device_plan import DevicePlan, EnvironmentProbe


class RunPlan(BaseModel):
    """One flow run of a run, decided: what to train, how, where, and from which checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    recipe: Recipe
    """The resolved recipe: run.name set, and adjusted to the device (the MPS profile) when the gates say so."""
    gates: ResolvedGates
    """The fix-plan gates (recipe.phases) resolved into behaviours."""
    devices: DevicePlan
    """Device type, precision and DataLoader workers, with the reason for each."""
    probe: EnvironmentProbe
    """What the planning machine offered (the device plan's input; logged and tagged on the MLflow run)."""
    run_dir: Path
    """The run directory, on storage every process of the run sees."""
    start: StartPoint
    """Fresh, or the verified checkpoint (and its step) training resumes from."""
    data_file: Path
    """The records every process reads: the checked copy of the user's data file in the run directory, or the
    built-in set shipped with the package."""
    launcher: Literal["in-process", "torchrun", "ray"]
    """in-process: one process, the caller's; torchrun: devices.nproc_per_node x devices.nnodes processes; ray:
    ray.workers Ray Train workers on the Ray cluster."""
    reference: Path | None = None
    """rho1-wmtp: the reference checkpoint every rank loads (None: rho1.reference_hf_model, or another algorithm)."""
    reference_run: RunPlan | None = None
    """rho1-wmtp with no reference named: the plan of the brief reference run, trained first into <run>/reference."""
    time_budget_s: float | None = None
    """Wall-clock seconds this flow run may train before it saves and stops; None trains to train.max_steps."""

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def finished(self) -> bool:
        """The start checkpoint is at train.max_steps already: nothing to train."""
        return self.start.step >= self.recipe.train.max_steps


@dataclass(frozen=True)
class PlannedRun:
    """A plan before it is written: the plan and the user's data text it checked (written beside it, once)."""

    plan: RunPlan
    data_text: str | None


def plan_run(
    recipe: Recipe,
    *,
    resume: At = None,
    probe: EnvironmentProbe | None = None,
    directory: Path | None = None,
    time_budget_s: float | None = None,
) -> PlannedRun:
    """Decide everything about a flow run of recipe; nothing is written (write_plan does that).

    resume: None for a new run, else where it continues (wmtp_core.run.start.choose_checkpoint's rules).
    directory: the run directory; default $WMTP_HOME/runs/<run.name>. probe: the machine (default: probe this one,
    or for devices.launcher=ray one of the cluster's, after checking the cluster can hold the workers).
    Raises RecipeError/ValueError (ClusterError: a Ray cluster unreachable or too small), DataError, CheckpointError,
    FileNotFoundError or FileExistsError, each saying what to change, before anything is written.
    """
    recipe = with_run_name(recipe, recipe.run.name or generate_run_name(recipe))
    layout = RunLayout(directory or run_dir(recipe.run.name))
    start = choose_checkpoint(layout, resume, continuing=True)
    data_text = _checked_data(recipe)
    probe = probe or probe_where_it_trains(recipe)
    recipe, gates, devices = plan_devices(recipe, probe)
    plan = RunPlan(
        recipe=recipe,
        gates=gates,
        devices=devices,
        probe=probe,
        run_dir=layout.root,
        start=start,
        data_file=layout.data if data_text is not None else builtin_dataset_path(),
        launcher=_launcher(recipe),
        time_budget_s=time_budget_s,
    )
    plan = _with_rho1_reference(plan)
    return PlannedRun(plan, data_text)


def plan_devices(recipe: Recipe, probe: EnvironmentProbe) -> tuple[Recipe, ResolvedGates, DevicePlan]:
    """The gates resolved, the device plan on the probed machine, and the recipe as the device adjusts it (the
    MPS profile; each key it changes is one of the plan's reasons). ValueError names the keys to change."""
    gates = resolve_gates(recipe.phases, recipe.checkpoint)
    device_policy, profile_policy = device_policies(gates)
    devices = device_policy(recipe.devices, recipe.data, probe)
    recipe, profile_reasons = profile_policy(recipe, devices)
    return recipe, gates, devices.model_copy(update={"reasons": devices.reasons + profile_reasons})


def write_plan(planned: PlannedRun) -> Path:
    """Create the run directory and write the recipe, the data copy and the plan (last); returns the plan's path."""
    plan, layout = planned.plan, planned.plan.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    write_atomically(layout.recipe, recipe_to_yaml(plan.recipe))
    if planned.data_text is not None:
        write_atomically(layout.data, planned.data_text)
    return save_plan(plan)


def save_plan(plan: RunPlan) -> Path:
    """Write plan.json (atomically: a process reading it never sees half of one); returns its path."""
    if plan.reference_run is not None:
        save_plan(plan.reference_run)
    plan.layout.root.mkdir(parents=True, exist_ok=True)
    write_atomically(plan.layout.plan, plan.model_dump_json(indent=2))
    return plan.layout.plan


def read_plan(path: Path) -> RunPlan:
    """The plan written at path (a plan.json, or the run directory holding one)."""
    path = RunLayout(path).plan if path.is_dir() else path
    return RunPlan.model_validate_json(path.read_text())


def restarted(plan: RunPlan) -> RunPlan:
    """The plan for another attempt after a failure: it starts from the run's newest valid checkpoint, which the
    failed attempt may have saved after the plan was made (the plan's own start when it saved none)."""
    newest = choose_checkpoint(plan.layout, "latest", continuing=True, fresh_if_none=True)
    return plan if newest.fresh or newest.step <= plan.start.step else plan.model_copy(update={"start": newest})


def _checked_data(recipe: Recipe) -> str | None:
    """The user's data file, read once and checked (DataError names file and line); None for the built-in set."""
    if recipe.data.path is None:
        return None
    path = Path(recipe.data.path)
    text = read_data_file(path)
    parse_records(text, source=path)
    return text


def _with_rho1_reference(plan: RunPlan) -> RunPlan:
    """A rho1-wmtp plan with its reference: the named checkpoint (verified), or the final checkpoint of the brief
    reference run, planned here (the run's own plan, with the brief recipe, in <run>/reference) and trained first."""
    from wmtp_core.algorithms.brief_reference import brief_reference_recipe, needs_brief_reference

    recipe = plan.recipe
    if recipe.train.algorithm != "rho1-wmtp" or recipe.rho1.reference_hf_model is not None:
        return plan
    if not needs_brief_reference(recipe):
        named = Path(recipe.rho1.reference_checkpoint)
        owner = RunLayout(named.parent.parent)  # <run>/checkpoints/step_...
        chosen = choose_checkpoint(owner, named, continuing=False, option="rho1.reference_checkpoint")
        return plan.model_copy(update={"reference": chosen.checkpoint})
    brief, reference = brief_reference_recipe(recipe), plan.layout.reference
    brief_run = plan.model_copy(
        update={
            "recipe": brief,
            "run_dir": reference.root,
            "start": choose_checkpoint(reference, "latest", continuing=True, fresh_if_none=True),
            "launcher": _launcher(brief),
            "time_budget_s": None,
        }
    )
    return plan.model_copy(
        update={"reference": reference.checkpoint(brief.train.max_steps), "reference_run": brief_run}
    )


def _launcher(recipe: Recipe) -> Literal["in-process", "torchrun", "ray"]:
    if recipe.devices.launcher == "ray":
        return "ray"
    return "torchrun" if recipe.devices.nproc_per_node * recipe.devices.nnodes > 1 else "in-process"


def probe_where_it_trains(recipe: Recipe) -> EnvironmentProbe:
    """What torch sees where recipe's run trains: this machine, or for devices.launcher=ray a machine of the
    cluster's workers (wmtp_core.runtime.ray_cluster.survey_cluster: the cluster reached and its capacity checked
    first; ClusterError otherwise). Loads torch."""
    if recipe.devices.launcher == "ray":
        from wmtp_core.runtime.ray_cluster import cluster_address, survey_cluster

        return survey_cluster(recipe.ray, cluster_address(recipe.ray))
    from wmtp_core.runtime.devices import probe_environment  # torch loads here

    return probe_environment()
