"""Where a run's files live: everything under $WMTP_HOME (default ./.wmtp). Imports neither torch nor prefect."""

from __future__ import annotations

import os
from pathlib import Path

from wmtp_core.config import check_run_name


def wmtp_home() -> Path:
    """The absolute home of all run output; $WMTP_HOME when set, else ./.wmtp."""
    return Path(os.environ.get("WMTP_HOME", ".wmtp")).expanduser().resolve()


def runs_dir() -> Path:
    """$WMTP_HOME/runs, where every run has its directory."""
    return wmtp_home() / "runs"


def run_dir(run_name: str) -> Path:
    """$WMTP_HOME/runs/<run_name>; the name is validated, so it cannot escape the home directory."""
    runs = runs_dir()
    path = (runs / check_run_name(run_name)).resolve()
    if path.parent != runs:
        raise ValueError(f"run name {run_name!r} resolves outside {runs}")
    return path


def summary_path(run_name: str) -> Path:
    """The JSON summary the train flow writes at the end of every invocation, success or failure."""
    return run_dir(run_name) / "summary.json"
