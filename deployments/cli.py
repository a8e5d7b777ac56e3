"""The `wmtp` command: train, resume, checkpoints, upload, convert-meta, verify, probe, serve, evaluate, generate, ui.
Input is validated before anything is written.

Exit codes: 0 success, 2 invalid input (the message names the field or file), 130 stopped by Ctrl-C and 143 by SIGTERM
(after saving a checkpoint at the step reached: `wmtp resume RUN` continues), 1 any other failure.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from deployments import cli_evaluation, ui
from deployments.checkpoint_commands import convert_checkpoint, print_checkpoints
from deployments.cli_options import (
    FAILURE,
    INVALID_INPUT,
    ExperimentOption,
    JsonOption,
    NameOption,
    PrintRecipeOption,
    RecipeOption,
    RunArgument,
    SetOption,
    existing_run_dir,
    invalid_input_guard,
)
from deployments.flow_runs import run_flow, wait_for_server
from deployments.progress_bars import byte_progress_bars
from flows.temporary_server import configured_api_url, default_prefect_environment, start_temporary_server
from wmtp_core.checkpoint.manifest import CheckpointError, latest_valid_checkpoint
from wmtp_core.config import Recipe, RecipeError, check_run_name
from wmtp_core.layout import RunLayout
from wmtp_core.recipes import load_recipe, recipe_to_yaml
from wmtp_core.run.summary import read_summary
from wmtp_core.runtime.stopping import EXIT_STATUS, Terminated, sigterm_raises

if TYPE_CHECKING:
    from wmtp_core.run.plan import PlannedRun

app = typer.Typer(
    no_args_is_help=True,
    help="Weighted multi-token-prediction training pipeline.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        print(f"wmtp {version('wmtp')}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_show_version, is_eager=True
    ),
) -> None:
    """Weighted multi-token-prediction training pipeline."""


def main() -> None:
    """Console entry point."""
    app()


@app.command()
def train(
    recipe: Path | None = RecipeOption,
    overrides: list[str] = SetOption,
    name: str | None = NameOption,
    experiment: str | None = ExperimentOption,
    print_recipe: bool = PrintRecipeOption,
    as_json: bool = JsonOption,
) -> None:
    """Train a new run (the embedded defaults when no recipe is given)."""
    shortcuts = [f"run.name={name}"] * (name is not None) + [f"tracking.experiment={experiment}"] * (
        experiment is not None
    )
    if print_recipe:
        print(recipe_to_yaml(invalid_input_guard(lambda: load_recipe(recipe, [*overrides, *shortcuts]))), end="")
        return
    loaded = invalid_input_guard(lambda: load_recipe(recipe, [*overrides, *shortcuts]))
    planned = invalid_input_guard(lambda: planned_or_refused(loaded, resume=None))
    run_stopping_on_sigterm(planned, resume=False, as_json=as_json)  # exits unless the run completed
    print(next_steps(planned.plan.recipe.run.name), file=sys.stderr)


def next_steps(run: str) -> str:
    """What a newcomer does after a first run: score it, try it, compare it with the next."""
    return (
        f"next: uv run wmtp evaluate {run}    (pass@k on code, per-head accuracy, decoding speed)\n"
        f'      uv run wmtp generate {run} --prompt "def add(a, b):"\n'
        "      uv run wmtp ui    (MLflow lists every run: select two or more, then Compare)"
    )


@app.command()
def resume(
    run: str = RunArgument,
    overrides: list[str] = SetOption,
    print_recipe: bool = PrintRecipeOption,
    as_json: bool = JsonOption,
) -> None:
    """Continue RUN from its newest valid checkpoint, e.g. with --set train.max_steps=600."""
    loaded = invalid_input_guard(lambda: _resume_recipe(run, overrides))
    if print_recipe:
        print(recipe_to_yaml(loaded), end="")
        return
    planned = invalid_input_guard(lambda: planned_or_refused(loaded, resume="latest"))
    run_stopping_on_sigterm(planned, resume=True, as_json=as_json)


def run_stopping_on_sigterm(planned: PlannedRun, *, resume: bool, as_json: bool) -> None:
    """run_flow, where SIGTERM (`timeout`, systemd, Slurm, often sent to the whole process group) stops the run as a
    first Ctrl-C does: the step ends, a checkpoint is saved, the run is summarised and reported, exit 143. Outside a
    training step (starting, reporting) the command ends at once: one line, exit 143, its cleanup run (the
    temporary Prefect server, in a session of its own, is stopped by the exit handler after the flow reported)."""
    try:
        with sigterm_raises():
            run_flow(planned, resume=resume, as_json=as_json)
    except Terminated:
        run_name = planned.plan.recipe.run.name
        latest = latest_valid_checkpoint(RunLayout.of_run(run_name).root, checksums=False)
        kept = f"its newest checkpoint is step {latest.step}" if latest else "no checkpoint was saved yet"
        go_on = f"continue with: wmtp resume {run_name}" if latest else f"start again with: wmtp train -n {run_name}"
        print(f"run {run_name} ended by SIGTERM outside a training step: {kept}\n{go_on}", file=sys.stderr)
        raise typer.Exit(EXIT_STATUS["SIGTERM"]) from None


@app.command()
def checkpoints(
    run: str = RunArgument,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
    convert: int | None = typer.Option(
        None, "--convert", help="Rewrite this step's sharded checkpoint in the full format."
    ),
) -> None:
    """List RUN's checkpoints, each verified against its manifest (the digest of every file)."""
    directory = invalid_input_guard(lambda: existing_run_dir(run))
    if convert is not None:
        convert_checkpoint(directory, convert)
    print_checkpoints(directory, as_json=as_json)


@app.command()
def upload(run: str = RunArgument) -> None:
    """Upload what RUN still owes MLflow (checkpoints, pending metrics, summary) and close its MLflow run."""
    directory = invalid_input_guard(lambda: existing_run_dir(run))
    layout = RunLayout(directory)
    from tracking.artifacts import upload_run
    from tracking.client import TrackingError, run_link, tracking_address
    from tracking.spool import tracking_spooled

    if not layout.tracking.is_file() and not tracking_spooled(directory):
        print(f"error: run {run!r} has no MLflow run (was tracking.enabled false?)", file=sys.stderr)
        raise typer.Exit(INVALID_INPUT)
    summary = read_summary(layout)
    succeeded = summary is not None and summary.status == "completed"
    finished = summary is None or summary.status != "stopped"  # a stopped run is resumed into the same MLflow run
    try:
        run_id = _tracking_run_of(directory)
        with byte_progress_bars() as on_progress:
            uploaded = upload_run(run_id, directory, succeeded=succeeded, finished=finished, on_progress=on_progress)
    except TrackingError as error:
        print(f"error: {error}; the uploads are still owed: run `wmtp upload {run}` again", file=sys.stderr)
        raise typer.Exit(FAILURE) from None
    if summary is not None:
        done = {"uploads": "done", "uploads_reason": None, "mlflow_run_id": run_id, "mlflow_link": run_link(directory)}
        summary.model_copy(update=done).write()
    closing = (
        f"closed it as {'FINISHED' if succeeded else 'FAILED'}"
        if finished
        else f"left it open: run {run} stopped before its last step, `wmtp resume {run}` continues it"
    )
    sent = ", ".join(uploaded) or "no new checkpoints"
    print(f"MLflow run {run_id} at {tracking_address()}: uploaded {sent}; {closing}")


def _tracking_run_of(directory: Path) -> str:
    """The run's MLflow run: the one recorded, or, for a run whose tracking was spooled, one opened now; a
    TrackingError that says so when the server cannot be reached."""
    from tracking.client import TrackingError, open_spooled_run, recorded_run_id, tracking_uri
    from tracking.spool import unreachable_reason

    unreachable = unreachable_reason(tracking_uri())
    if unreachable:
        raise TrackingError(unreachable)
    return recorded_run_id(directory) or open_spooled_run(directory)


@app.command("convert-meta")
def convert_meta(
    model_dir: Path = typer.Argument(..., help="Meta's checkpoint directory: consolidated*.pth and params.json."),
    out_dir: Path = typer.Argument(..., help="Where to write the transformers directory (then model.path=OUT_DIR)."),
    tokenizer: str = typer.Option(
        ..., "--tokenizer", help="The transformers copy of the model's tokenizer (a directory or hub id; Llama 2's)."
    ),
) -> None:
    """Convert a Meta multi-token-prediction checkpoint (e.g. the 7B models) for model.source=hf."""
    from wmtp_core.models.meta_mtp import convert_meta_mtp  # torch and transformers load here

    with byte_progress_bars() as on_progress:
        out = invalid_input_guard(
            lambda: convert_meta_mtp(model_dir, out_dir, tokenizer=tokenizer, on_progress=on_progress)
        )
    print(f"wrote {out}: train it with --set model.source=hf --set model.path={out}")


@app.command()
def verify(
    as_json: bool = JsonOption,
    stages: list[str] = typer.Option([], "--stage", help="Rollout stage to run (repeatable; default all, in order)."),
    models: list[str] = typer.Option([], "--model", help="plain or fsdp (repeatable; default both)."),
) -> None:
    """Measure the fix plan's success metrics for each rollout stage; exit 1 when the last stage misses a target."""
    from wmtp_core.launch.verification import MODELS, STAGES

    unknown = [s for s in stages if s not in STAGES] + [m for m in models if m not in MODELS]
    if unknown:
        print(
            f"error: unknown --stage/--model {unknown}; stages are {list(STAGES)}, models {list(MODELS)}",
            file=sys.stderr,
        )
        raise typer.Exit(INVALID_INPUT)
    default_prefect_environment()
    server_ready = start_temporary_server()
    from flows.fixplan import wmtp_fixplan

    wait_for_server(server_ready)
    state = wmtp_fixplan(stages=stages or list(STAGES), models=models or list(MODELS), return_state=True)
    report = state.result(raise_on_failure=False)
    if not isinstance(report, dict):
        print(f"error: wmtp-fixplan ended {state.name}: {state.message}", file=sys.stderr)
        raise typer.Exit(FAILURE)
    for row in report["stages"]:
        print(
            f"{row['stage']:>9} {row['model']:>5}  save {row['checkpoint_save_success']:.0%}  resume "
            f"{row['resume_success']:.0%}  warnings {row['warnings']:>3}  leaked semaphores "
            f"{row['leaked_semaphores']:>3}"
            f"  step {row['step_time_s']} s",
            file=sys.stderr if as_json else sys.stdout,
        )
    print(f"report: {report['report']}; {'PASSED' if report['passed'] else 'FAILED'}", file=sys.stderr)
    if as_json:
        print(json.dumps({"stages": report["stages"], "passed": report["passed"]}), flush=True)
    if not report["passed"]:
        raise typer.Exit(FAILURE)


@app.command()
def probe(recipe: Path | None = RecipeOption, overrides: list[str] = SetOption) -> None:
    """Show what the machine the run would train on offers (this one, or with devices.launcher=ray one of the Ray
    cluster's workers) and the device plan the recipe would get."""
    from wmtp_core.run.plan import plan_devices, probe_where_it_trains

    loaded = invalid_input_guard(lambda: load_recipe(recipe, overrides))
    found = invalid_input_guard(lambda: probe_where_it_trains(loaded))
    _, _, devices = invalid_input_guard(lambda: plan_devices(loaded, found))
    print(json.dumps({"environment": found.to_dict(), "device_plan": devices.model_dump()}, indent=2))


@app.command()
def serve(
    resume_cron: str | None = typer.Option(
        None,
        "--resume-cron",
        envvar="WMTP_RESUME_CRON",
        help="When wmtp-resume/scheduled runs (cron, UTC); default every 6 hours.",
    ),
    resume_run: str | None = typer.Option(
        None,
        "--resume-run",
        envvar="WMTP_RESUME_RUN",
        help="The run the schedule continues; without it the schedule starts paused.",
    ),
    resume_budget: float | None = typer.Option(
        None,
        "--resume-budget-minutes",
        envvar="WMTP_RESUME_BUDGET_MINUTES",
        help="Wall-clock minutes each scheduled resume may train.",
    ),
) -> None:
    """Serve wmtp-train/manual, wmtp-resume/scheduled, wmtp-evaluate/manual and wmtp-fixplan/verify to the
    configured Prefect server (PREFECT_API_URL from the environment, the active profile or prefect.toml)."""
    default_prefect_environment()
    if configured_api_url() is None:
        print(
            "error: wmtp serve needs a Prefect server: start one (`uv run wmtp ui` does) and name its API for this "
            "command: PREFECT_API_URL=http://127.0.0.1:4200/api uv run wmtp serve",
            file=sys.stderr,
        )
        raise typer.Exit(INVALID_INPUT)
    from deployments.served import serve_deployments, served_deployments

    deployments = invalid_input_guard(
        lambda: served_deployments(
            resume_cron=resume_cron,
            resume_run=resume_run and check_run_name(resume_run),
            resume_budget_minutes=resume_budget,
        )
    )
    serve_deployments(deployments)


app.command()(cli_evaluation.evaluate)
app.command()(cli_evaluation.generate)
app.command()(ui.ui)


def planned_or_refused(recipe: Recipe, *, resume: str | None) -> PlannedRun:
    """The run planned before anything starts or is written; what the user must change is a RecipeError (exit 2)."""
    from wmtp_core.run.plan import plan_run  # torch loads here, to probe the machine

    try:
        return plan_run(recipe, resume=resume)
    except (CheckpointError, FileExistsError, FileNotFoundError) as error:
        raise RecipeError(str(error)) from None


def _resume_recipe(run: str, overrides: list[str]) -> Recipe:
    directory = existing_run_dir(run)
    loaded = load_recipe(RunLayout(directory).recipe, overrides)
    if loaded.run.name != run:
        raise RecipeError(f"run.name cannot change on resume (got {loaded.run.name!r} for run {run!r})")
    return loaded
