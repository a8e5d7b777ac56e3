"""The options and arguments the `wmtp` commands share, with their help text and shell completion."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from wmtp_core.config import RecipeError
from wmtp_core.layout import run_dir, runs_dir
from wmtp_core.runtime.redaction import redact_credentials

INVALID_INPUT, FAILURE = 2, 1  # exit codes (and 0 success)
INTERRUPTED = 130  # the shell's convention for a command ended by Ctrl-C (128 + SIGINT)

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


def existing_run_dir(run: str) -> Path:
    directory = run_dir(run)
    if not directory.is_dir():
        raise RecipeError(f"run {run!r} does not exist under {directory.parent}")
    return directory


def invalid_input_guard(build):
    """Run a validation step; a ValueError (RecipeError, DataError, bad run name) exits 2 with one line."""
    try:
        return build()
    except ValueError as error:
        print(f"error: {redact_credentials(str(error))}", file=sys.stderr)
        raise typer.Exit(INVALID_INPUT) from None
