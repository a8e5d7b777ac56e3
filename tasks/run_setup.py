"""Task: resolve a run's name and directory, check its data, and record its recipe before training starts."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.locations import run_dir
from wmtp_core.checkpoint.manifest import (
    CheckpointError,
    Verdicts,
    checkpoints_dir,
    latest_valid_checkpoint,
    step_dir_name,
    verdict_of,
)
from wmtp_core.config import Recipe, generate_run_name, with_run_name
from wmtp_core.data.records import builtin_dataset_path, load_records
from wmtp_core.recipes import recipe_to_yaml


@task(name="prepare_run", cache_policy=NO_CACHE)
def prepare_run(recipe: Recipe, *, resume: str | int | Path | None, verdicts: Verdicts | None = None) -> dict:
    """Create $WMTP_HOME/runs/<name>, write recipe.yaml and return {run_name, run_dir, start_checkpoint, verdicts}.

    A fresh run (resume None) refuses a name that already has checkpoints; a resume needs the checkpoint it names,
    which is verified here, once for the whole flow run: the returned verdicts (with any the caller passed in) go
    to the tasks that follow, which hash it no more.
    """
    name = recipe.run.name or generate_run_name(recipe)
    directory = run_dir(name)
    verdicts = dict(verdicts or {})
    start = start_checkpoint(name, directory, resume, verdicts=verdicts)
    _check_data(recipe)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "recipe.yaml").write_text(recipe_to_yaml(with_run_name(recipe, name)))
    get_run_logger().info("run %s in %s (%s)", name, directory, f"resume from {start}" if start else "new")
    return {
        "run_name": name,
        "run_dir": str(directory),
        "start_checkpoint": str(start) if start else None,
        "verdicts": verdicts,
    }


def start_checkpoint(
    name: str, directory: Path, resume: str | int | Path | None, *, verdicts: Verdicts | None = None
) -> Path | None:
    """The checkpoint a run starts from: none for a new run, else the one `resume` names ("latest", a step of the
    run or a checkpoint directory), checked against its manifest unless verdicts (updated here) holds its verdict.

    A run that has checkpoints continues only from its newest (an older one would be overwritten by the new saves).
    """
    verdicts = verdicts if verdicts is not None else {}
    if resume is None:
        if latest_valid_checkpoint(directory, checksums=False) is not None:  # any complete one: nothing is hashed
            raise FileExistsError(
                f"run {name!r} already has checkpoints; resume it (resume=latest, `wmtp resume {name}`) "
                "or pick another run.name"
            )
        return None
    if resume == "latest":
        latest = latest_valid_checkpoint(directory, verdicts=verdicts)
        if latest is None:
            raise FileNotFoundError(
                f"run {name!r} has no valid checkpoint in {directory / 'checkpoints'} to resume from"
            )
        return latest.path
    path = checkpoints_dir(directory) / step_dir_name(resume) if isinstance(resume, int) else Path(resume).resolve()
    if (problem := verdict_of(path, verdicts)) is not None:
        raise CheckpointError(problem)
    latest = latest_valid_checkpoint(directory, verdicts=verdicts)
    if latest is not None and latest.path != path:
        raise FileExistsError(
            f"run {name!r} already has checkpoints up to step {latest.step}, so it continues only from "
            f"the newest (resume=latest); to branch from {path}, pass it as resume with a new run.name"
        )
    return path


def _check_data(recipe: Recipe) -> None:
    """Fail before any training when the data file is missing or malformed (the error names file and line)."""
    load_records(Path(recipe.data.path) if recipe.data.path else builtin_dataset_path())
