"""The MLflow client of a run: run creation and reuse, params, tags, metric batches, links (artifact uploads:
tracking.artifacts).

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
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.git_utils import get_git_commit
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from tracking.errors import TrackingError as TrackingError  # the error its functions raise, for callers
from tracking.errors import credentials_redacted
from tracking.metrics_buffer import BufferedMetrics, Point, SpooledMetrics, read_pending
from tracking.spool import PENDING_UPLOADS_FILE as PENDING_UPLOADS_FILE  # where it was defined before
from tracking.spool import pending_uploads, tracking_spooled
from wmtp_core.config import Recipe
from wmtp_core.layout import RunLayout, wmtp_home
from wmtp_core.recipes import flatten_recipe
from wmtp_core.runtime.atomic_files import write_atomically
from wmtp_core.runtime.redaction import redact_credentials, without_credentials

log = logging.getLogger(__name__)
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_METRICS_TIMEOUT_S = 10  # one log-batch request of at most 1000 points; uploads keep MLflow's own timeout
# MLflow 3's UI opens an experiment on the view its kind names; without the tag it guesses GenAI (traces). mlflow
# exports no constant for either; these are the values its UI defines (ExperimentKind in mlflow/server/js).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
_EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the embedded SQLite store under $WMTP_HOME. For MLflow only: what is shown
    or stored is tracking_address()."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{wmtp_home() / 'mlflow.db'}"


def tracking_address() -> str:
    """The tracking URI as logs, files and messages show it: its password and secret query values as ***."""
    return redact_credentials(tracking_uri())


TRAINING_VIEW = "workflowType=machine_learning"
"""A query on an MLflow UI address that opens it on training runs: MLflow 3.x's UI shows its GenAI pages (traces)
until a person switches to "Model training", whatever the experiment's mlflow.experimentKind tag says."""


def ui_command() -> str:
    """How to open the MLflow UI on the store this process uses."""
    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        return "uv run wmtp ui"  # the MLflow UI on the embedded store, and the Prefect UI beside it
    return f"open {without_credentials(uri)}"


def client() -> MlflowClient:
    # MLflow's own HTTP retries (7, exponential) would hold a call for minutes while a server is down; fail
    # fast instead and let our buffer (metrics) and Prefect's task retries (uploads) do the retrying. No
    # process-wide MLFLOW_HTTP_REQUEST_TIMEOUT: it would also bound artifact uploads, which a server proxying to
    # an object store answers only once the whole file is copied (metric calls get their own, _METRICS_TIMEOUT_S).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    # Large files go in parts where the server's store supports it (S3, GCS, Azure); others fall back to one PUT.
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")
    # Our own bars show transfers (deployments/progress_bars.py): MLflow's tqdm bar, and its notices as it creates
    # a new store's tables, are noise on the CLI's stderr. Its warnings still show.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: URL" as a run ends, the tracking URI's password included; our summary gives
    # the link (run_link) without it.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri())


@credentials_redacted
def open_tracking_run(recipe: Recipe, run_dir: Path, *, run_name: str, extra_tags: dict[str, str]) -> str:
    """The MLflow run id of this WMTP run: the one recorded in run_dir if any (a resume), else a new run."""
    recorded = RunLayout(run_dir).tracking
    mlflow = client()
    if recorded.is_file():
        run_id = json.loads(recorded.read_text())["mlflow_run_id"]
        mlflow.update_run(run_id, status="RUNNING")
    else:
        experiment_id = _experiment_id(mlflow, recipe.tracking.experiment)
        tags = {"wmtp.run_name": run_name, **{f"tag.{t}": "true" for t in recipe.run.tags}, **extra_tags}
        tags = _context_tags(tags)
        run_id = mlflow.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        record = {"mlflow_run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_address()}
        write_atomically(recorded, json.dumps(record))
    log_recipe_params(mlflow, run_id, recipe)
    return run_id


def recorded_run_id(run_dir: Path) -> str | None:
    """The MLflow run id in the run's tracking.json; None when no MLflow run was opened for it."""
    recorded = RunLayout(run_dir).tracking
    return json.loads(recorded.read_text())["mlflow_run_id"] if recorded.is_file() else None


@credentials_redacted
def open_spooled_run(run_dir: Path) -> str:
    """Open the MLflow run of a run whose tracking was spooled (tracking.spool) as its first flow run would have:
    the recipe as params, the environment probe and the tags noted when it was spooled."""
    from wmtp_core.run.plan import read_plan

    run_plan = read_plan(RunLayout(run_dir).plan)
    recipe, tags = run_plan.recipe, pending_uploads(run_dir).get("spooled_tags", {})
    run_id = open_tracking_run(recipe, run_dir, run_name=recipe.run.name, extra_tags=tags)
    log_environment_tags(run_id, run_plan.probe.to_dict())
    return run_id


def _context_tags(tags: dict[str, str]) -> dict[str, str]:
    """MLflow's context tags (user, source name and type) and the git commit of this code: MLflow looks for it
    beside the entry script, which for `wmtp` sits in the virtual environment that git ignores."""
    resolved = resolve_tags(tags)
    if MLFLOW_GIT_COMMIT not in resolved:
        commit = get_git_commit(str(Path(__file__).parent))
        if commit:
            resolved[MLFLOW_GIT_COMMIT] = commit
    return resolved


def log_recipe_params(mlflow: MlflowClient, run_id: str, recipe: Recipe) -> None:
    """The flattened recipe as params; keys already logged with the same value are skipped (MLflow params are
    immutable)."""
    existing = mlflow.get_run(run_id).data.params
    params = [Param(k, v) for k, v in flatten_recipe(recipe).items() if existing.get(k) != v]
    changed = [p.key for p in params if p.key in existing]
    if changed:
        # A resume with --set overrides: MLflow cannot overwrite a param, so record the new values as tags.
        tags = [RunTag(f"override.{p.key}", p.value) for p in params if p.key in existing]
        mlflow.log_batch(run_id, tags=tags, synchronous=True)
        params = [p for p in params if p.key not in existing]
    for start in range(0, len(params), _MAX_PARAMS_PER_BATCH):
        mlflow.log_batch(run_id, params=params[start : start + _MAX_PARAMS_PER_BATCH], synchronous=True)


class MetricsSink:
    """The legacy callback (phases.api off): each report is one log_batch request, and its errors stop training."""

    def __init__(self, run_id: str):
        self.send = point_sender(run_id)

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.send([(key, float(value), now, step) for key, value in metrics.items()])

    def close(self) -> int:
        return 0


def metrics_sink(
    run_id: str | None, run_dir: Path, *, safe: bool
) -> MetricsSink | BufferedMetrics | SpooledMetrics | None:
    """The training callback: buffered and failure-proof when safe (phases.api on), else the legacy one; without
    an MLflow run, the pending file when the run's tracking is spooled (tracking.spool), else none."""
    if run_id is None:
        return SpooledMetrics(RunLayout(run_dir).pending_metrics) if tracking_spooled(run_dir) else None
    if safe:
        return BufferedMetrics(point_sender(run_id), pending_path=RunLayout(run_dir).pending_metrics)
    return MetricsSink(run_id)


def point_sender(run_id: str):
    """A function that logs a list of (key, value, timestamp_ms, step) points in one request and returns only once
    the store has them (synchronous even with MLFLOW_ENABLE_ASYNC_LOGGING=true, so a failure is seen and the
    points kept); requests to a tracking server time out after _METRICS_TIMEOUT_S."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return _rest_point_sender(run_id, uri)
    mlflow = client()

    @credentials_redacted
    def send(points: list[Point]) -> None:
        mlflow.log_batch(run_id, metrics=_metrics(points), synchronous=True)

    return send


def _rest_point_sender(run_id: str, uri: str):
    # MlflowClient.log_batch has no per-call timeout (only the process-wide MLFLOW_HTTP_REQUEST_TIMEOUT), so the
    # same LogBatch request goes through MLflow's REST helper with a timeout of its own.
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.proto_json_utils import message_to_json
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    endpoint = "/api/2.0/mlflow/runs/log-batch"
    client()  # the retry default above

    @credentials_redacted
    def send(points: list[Point]) -> None:
        body = message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in _metrics(points)]))
        creds = get_default_host_creds(uri)
        response = http_request(creds, endpoint, "POST", json=json.loads(body), timeout=_METRICS_TIMEOUT_S)
        verify_rest_response(response, endpoint)

    return send


def _metrics(points: list[Point]) -> list[Metric]:
    return [Metric(key, value, stamp, step) for key, value, stamp, step in points]


@credentials_redacted
def upload_pending_metrics(run_id: str, run_dir: Path) -> int:
    """Send the metric points a previous run could not; the pending file is removed once they are all sent."""
    pending_file = RunLayout(run_dir).pending_metrics
    points = read_pending(pending_file)
    send = point_sender(run_id)
    for start in range(0, len(points), _MAX_METRICS_PER_BATCH):
        send(points[start : start + _MAX_METRICS_PER_BATCH])
    pending_file.unlink(missing_ok=True)
    return len(points)


@credentials_redacted
def log_environment_tags(run_id: str, probe: dict) -> None:
    """The environment probe as `env.*` tags on the run."""
    tags = [RunTag(f"env.{key}", str(value)) for key, value in probe.items()]
    client().log_batch(run_id, tags=tags, synchronous=True)


def run_link(run_dir: Path) -> str | None:
    """Where to see the run's MLflow page, from tracking.json (no request to the server, which may be down)."""
    recorded = RunLayout(run_dir).tracking
    if not recorded.is_file():
        return None
    info = json.loads(recorded.read_text())
    uri = info.get("tracking_uri") or tracking_address()  # a record that names no store: this process's
    run_id, experiment_id = info["mlflow_run_id"], info.get("experiment_id", "0")
    if uri.startswith("http"):
        return f"{without_credentials(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"
    page = f"#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"
    return f"http://127.0.0.1:5000/{page} (with `uv run wmtp ui` open; its port if 5000 was taken)"


def _experiment_id(mlflow: MlflowClient, name: str) -> str:
    """The experiment's id, created if new; either way marked as model training (one a user marked otherwise
    keeps their kind)."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        if tracking_uri().startswith("sqlite:"):
            artifact_location = (wmtp_home() / "mlartifacts").as_uri()
        return mlflow.create_experiment(name, artifact_location=artifact_location, tags=_EXPERIMENT_TAGS)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id
