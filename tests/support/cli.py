"""The real `wmtp` console script in a subprocess, with an environment that names its home and servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.tracking_store import seed_tracking_store

WMTP = str(Path(sys.executable).parent / "wmtp")


def wmtp_environment(
    home: Path, *, api_url: str | None = None, mlflow_uri: str | None = None, fresh: bool = False
) -> dict[str, str]:
    """The environment of a `wmtp` subprocess: this process's, minus Prefect/MLflow settings, plus the given ones.

    Without api_url the command starts its own temporary Prefect server (about 20 s on two cores). Its
    PREFECT_HOME is its own (beside home): the user's profiles in ~/.prefect must not reach a test. Unless fresh,
    home gets an empty embedded MLflow store made once per session (support.tracking_store), if it has none.
    """
    if not fresh:
        seed_tracking_store(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["WMTP_HOME"] = str(home)
    env["PREFECT_HOME"] = f"{home}-prefect-home"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    return env


def run_wmtp_json(
    args: list[str],
    *,
    home: Path,
    api_url: str | None = None,
    mlflow_uri: str | None = None,
    timeout: int = 600,
    fresh: bool = False,
) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run `wmtp ARGS --json`; return the finished process and the JSON it printed last (None if it printed none).
    fresh: home as a new user's, nothing made in it beforehand (see wmtp_environment)."""
    env = wmtp_environment(home, api_url=api_url, mlflow_uri=mlflow_uri, fresh=fresh)
    out = subprocess.run([WMTP, *args, "--json"], env=env, capture_output=True, text=True, timeout=timeout)
    lines = out.stdout.strip().splitlines()
    try:
        return out, json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return out, None
