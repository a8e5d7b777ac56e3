"""Task: resolve a run's name and directory, check its data, and record its recipe before training starts."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.locations import run_dir
from wmtp_core.config import Recipe, generate_run_name, with_run_name
from wmtp_core.recipes import recipe_to_yaml
from wmtp_core.manifest import latest_valid_checkpoint


@task(name="prepare_run", cache_policy=NO_CACHE)
def prepare_run(recipe: Recipe, *, resume: bool) -> dict:
    """Create $WMTP_HOME/runs/<name>, write recipe.yaml and return {run_name, run_dir}.

    A fresh run refuses a name that already has checkpoints (resume it instead); a resume needs one.
    """
    name = recipe.run.name or generate_run_name(recipe)
    directory = run_dir(name)
    latest = latest_valid_checkpoint(directory)
    if resume and latest is None:
        raise FileNotFoundError(f"run {name!r} has no valid checkpoint in {directory / 'checkpoints'} to resume from")
    if not resume and latest is not None:
        raise FileExistsError(f"run {name!r} already has checkpoints; resume it with `wmtp resume {name}` or pick another run.name")
    _check_data(recipe)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "recipe.yaml").write_text(recipe_to_yaml(with_run_name(recipe, name)))
    get_run_logger().info("run %s in %s (%s)", name, directory, "resume" if resume else "new")
    return {"run_name": name, "run_dir": str(directory)}


def _check_data(recipe: Recipe) -> None:
    """Fail before any training when the data file is missing or malformed (the error names file and line)."""
    from wmtp_core.data import builtin_dataset_path, load_records

    load_records(Path(recipe.data.path) if recipe.data.path else builtin_dataset_path())
