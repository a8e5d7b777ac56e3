"""The options and arguments the `wmtp` commands share, with their help text and shell completion."""

from __future__ import annotations

import typer

from tasks.locations import runs_dir

RecipeOption = typer.Option(None, "--recipe", help="YAML recipe file (flat and complete; see configs/).")
SetOption = typer.Option([], "--set", help="Override a recipe key, e.g. --set train.lr=1e-3 (repeatable).")
JsonOption = typer.Option(False, "--json", help="Print one JSON summary object as the last stdout line.")
NameOption = typer.Option(None, "--name", "-n", help="Run name (short for --set run.name=NAME).")
ExperimentOption = typer.Option(
    None, "--experiment", help="MLflow experiment (short for --set tracking.experiment=NAME)."
)
PrintRecipeOption = typer.Option(
    False, "--print-recipe", help="Print the resolved recipe (YAML, defaults and overrides applied) and exit."
)


def complete_run_names(incomplete: str) -> list[str]:
    """Shell completion: the runs under $WMTP_HOME/runs whose name starts with what was typed."""
    runs = runs_dir()
    if not runs.is_dir():
        return []
    return sorted(p.name for p in runs.iterdir() if p.is_dir() and p.name.startswith(incomplete))


RunArgument = typer.Argument(
    ..., help="The run's name (a directory under $WMTP_HOME/runs).", autocompletion=complete_run_names
)
