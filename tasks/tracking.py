"""The one module that talks to MLflow: run creation and reuse, params, metric batches, artifact uploads.

With no MLFLOW_TRACKING_URI the store is embedded: SQLite at $WMTP_HOME/mlflow.db with artifacts in
$WMTP_HOME/mlartifacts (MLflow 3.17+ refuses the old ./mlruns file store).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from tasks.locations import wmtp_home
from wmtp_core.manifest import list_checkpoints
from wmtp_core.config import Recipe
from wmtp_core.recipes import flatten_recipe

log = logging.getLogger(__name__)
TRACKING_FILE = "tracking.json"
_MAX_PARAMS_PER_BATCH = 100


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the embedded SQLite store under $WMTP_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{wmtp_home() / 'mlflow.db'}"


def ui_command() -> str:
    """How to open the MLflow UI on the store this process uses."""
    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        return f"uv run mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri}"


def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def open_tracking_run(recipe: Recipe, run_dir: Path, *, run_name: str, extra_tags: dict[str, str]) -> str:
    """The MLflow run id of this WMTP run: the one recorded in run_dir if any (a resume), else a new run."""
    recorded = run_dir / TRACKING_FILE
    mlflow = client()
    if recorded.is_file():
        run_id = json.loads(recorded.read_text())["mlflow_run_id"]
        mlflow.update_run(run_id, status="RUNNING")
    else:
        experiment_id = _experiment_id(mlflow, recipe.tracking.experiment)
        tags = {"wmtp.run_name": run_name, **{f"tag.{t}": "true" for t in recipe.run.tags}, **extra_tags}
        run_id = mlflow.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        recorded.write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": tracking_uri()}))
    log_recipe_params(mlflow, run_id, recipe)
    return run_id


def log_recipe_params(mlflow: MlflowClient, run_id: str, recipe: Recipe) -> None:
    """The flattened recipe as params; keys already logged with the same value are skipped (MLflow params are immutable)."""
    existing = mlflow.get_run(run_id).data.params
    params = [Param(k, v) for k, v in flatten_recipe(recipe).items() if existing.get(k) != v]
    changed = [p.key for p in params if p.key in existing]
    if changed:
        # A resume with --set overrides: MLflow cannot overwrite a param, so record the new values as tags.
        mlflow.log_batch(run_id, tags=[RunTag(f"override.{p.key}", p.value) for p in params if p.key in existing])
        params = [p for p in params if p.key not in existing]
    for start in range(0, len(params), _MAX_PARAMS_PER_BATCH):
        mlflow.log_batch(run_id, params=params[start : start + _MAX_PARAMS_PER_BATCH])


class MetricsSink:
    """A training callback: each report becomes one log_batch request (never one request per metric)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.mlflow = client()

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.mlflow.log_batch(self.run_id, metrics=batch)


def upload_checkpoints(run_id: str, run_dir: Path) -> list[str]:
    """Upload each valid checkpoint directory not yet in the run's artifacts; returns the uploaded names."""
    mlflow = client()
    present = {Path(a.path).name for a in mlflow.list_artifacts(run_id, "checkpoints")}
    uploaded = []
    for info in list_checkpoints(run_dir):
        if info.valid and info.path.name not in present:
            mlflow.log_artifacts(run_id, str(info.path), f"checkpoints/{info.path.name}")
            uploaded.append(info.path.name)
    return uploaded


def upload_file(run_id: str, path: Path) -> None:
    client().log_artifact(run_id, str(path))


def finish_tracking_run(run_id: str, *, succeeded: bool) -> None:
    client().set_terminated(run_id, status="FINISHED" if succeeded else "FAILED")


def run_link(run_id: str) -> str:
    """A link to the run for summaries: the server page for http stores, else the store and run id."""
    uri = tracking_uri()
    run = client().get_run(run_id)
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"{uri} (experiment {run.info.experiment_id}, run {run_id})"


def _experiment_id(mlflow: MlflowClient, name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri().startswith("sqlite:"):
        artifact_location = (wmtp_home() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)
