"""What a run uploads to MLflow as artifacts: its checkpoints, its final model (also an MLflow Model, registered
where the recipe names one) and summary.json, each upload resumable and never sent twice; upload_run sends what a
run still owes and ends its MLflow run."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from tracking.client import client, upload_pending_metrics
from tracking.errors import credentials_redacted
from tracking.spool import PENDING_UPLOADS_FILE
from wmtp_core.checkpoint.manifest import FINAL_MODEL_CONFIG, MANIFEST_FILE, Verdicts, list_checkpoints, verdict_of
from wmtp_core.layout import RunLayout
from wmtp_core.progress import DescribedProgress
from wmtp_core.run.start import choose_checkpoint

log = logging.getLogger(__name__)


@credentials_redacted
def upload_checkpoints(
    run_id: str, run_dir: Path, *, verdicts: Verdicts | None = None, on_progress: DescribedProgress | None = None
) -> list[str]:
    """Upload each valid checkpoint whose manifest is not yet in the run's artifacts (the manifest goes last, so an
    upload cut short is redone whole); returns the uploaded names.

    Only those not yet uploaded are verified, and not those verdicts (updated here) already holds a verdict for:
    the flow's resume point and what its training saved.
    """
    mlflow = client()
    verdicts = verdicts if verdicts is not None else {}
    missing = [
        info.path
        for info in list_checkpoints(run_dir, checksums=False)  # presence and sizes; digests below, where needed
        if info.valid
        and not _has_artifact(mlflow, run_id, f"checkpoints/{info.path.name}/{MANIFEST_FILE}")
        and verdict_of(info.path, verdicts) is None
    ]
    files = [f for path in missing for f in _folder_files(path, f"checkpoints/{path.name}", last=MANIFEST_FILE)]
    _send_files(mlflow, run_id, files, description="uploading checkpoints", on_progress=on_progress)
    return [checkpoint.name for checkpoint in missing]


def _has_artifact(mlflow: MlflowClient, run_id: str, path: str) -> bool:
    """Whether the run holds the artifact at path: the file an upload sends last says the upload is whole."""
    folder = path.rpartition("/")[0]
    return path in {artifact.path for artifact in mlflow.list_artifacts(run_id, folder)}


def _folder_files(root: Path, folder: str, *, last: str) -> list[tuple[Path, str]]:
    """(file, artifact folder) for every file under root, mirrored under folder, with the file named `last` last."""
    files = sorted((f for f in root.rglob("*") if f.is_file()), key=lambda f: (f.name == last, str(f)))
    return [(f, f"{folder}/{f.parent.relative_to(root).as_posix()}".removesuffix("/.")) for f in files]


def _send_files(
    mlflow: MlflowClient,
    run_id: str,
    files: list[tuple[Path, str]],
    *,
    description: str,
    on_progress: DescribedProgress | None,
) -> None:
    """log_artifact each (file, artifact folder) in order, reporting the bytes sent after each file."""
    total, done = sum(file.stat().st_size for file, _ in files), 0
    for file, folder in files:
        mlflow.log_artifact(run_id, str(file), folder)
        done += file.stat().st_size
        if on_progress is not None:
            on_progress(description, done, total)


@credentials_redacted
def upload_final_model(
    run_id: str, run_dir: Path, *, verdicts: Verdicts | None = None, on_progress: DescribedProgress | None = None
) -> bool:
    """Log the newest checkpoint's model as `final_model/` (wmtp_core.checkpoint.final_model: safetensors and a
    config, no pickle; an hf trunk as save_pretrained writes it), which is also an MLflow Model
    (tracking.mlflow_model: `mlflow.pyfunc.load_model("runs:/ID/final_model")` generates text), unless it is
    there already for that step. A resume that trains on replaces it. Load it with
    `wmtp_core.checkpoint.final_model.load_final_model(mlflow.artifacts.download_artifacts(...))` or MLflow's
    loaders. The newest checkpoint is hashed only when verdicts has none for it.
    """
    # torch loads here, not when a flow module is imported
    from tracking.mlflow_model import add_mlflow_model
    from wmtp_core.checkpoint.final_model import write_final_model

    mlflow = client()
    latest = _newest_checkpoint(run_dir, verdicts)
    if latest.fresh or _final_model_step(mlflow, run_id) == latest.step:
        return False
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "final_model"
        model_dir.mkdir()
        write_final_model(latest.checkpoint, model_dir, verified=True)
        add_mlflow_model(model_dir)
        # The config, which names the step, goes last: an upload cut short is redone by the next attempt.
        uploads = _folder_files(model_dir, "final_model", last=FINAL_MODEL_CONFIG)
        _send_files(mlflow, run_id, uploads, description="uploading the final model", on_progress=on_progress)
    return True


def _newest_checkpoint(run_dir: Path, verdicts: Verdicts | None):
    """The run's newest valid checkpoint (fresh when it has none), hashed only when verdicts has no verdict."""
    return choose_checkpoint(RunLayout(run_dir), "latest", continuing=False, fresh_if_none=True, verdicts=verdicts)


@credentials_redacted
def register_final_model(run_id: str, run_dir: Path, *, verdicts: Verdicts | None = None) -> str | None:
    """Register the run's final model as a version of the registered model the newest checkpoint's recipe names
    (tracking.register_model), unless a version of this run holds that step already; returns the version, None
    when the recipe names no model or the run has no checkpoint."""
    from tracking.mlflow_model import register_version
    from wmtp_core.checkpoint.storage import read_checkpoint_manifest  # torch loads here

    latest = _newest_checkpoint(run_dir, verdicts)
    if latest.fresh:
        return None
    name = read_checkpoint_manifest(latest.checkpoint, verified=True)["recipe"]["tracking"].get("register_model")
    if name is None:
        return None
    return register_version(client(), name, run_id=run_id, step=latest.step)


def _final_model_step(mlflow: MlflowClient, run_id: str) -> int | None:
    """The step of the run's uploaded final model, None if it has none."""
    if not _has_artifact(mlflow, run_id, f"final_model/{FINAL_MODEL_CONFIG}"):
        return None
    with tempfile.TemporaryDirectory() as scratch:
        config = mlflow.download_artifacts(run_id, f"final_model/{FINAL_MODEL_CONFIG}", scratch)
        return json.loads(Path(config).read_text())["step"]


@credentials_redacted
def upload_run(
    run_id: str,
    run_dir: Path,
    *,
    succeeded: bool,
    finished: bool = True,
    verdicts: Verdicts | None = None,
    on_progress: DescribedProgress | None = None,
) -> list[str]:
    """Everything not yet in the MLflow run: checkpoints, the final model (registered where the recipe names a
    registered model), pending metrics, summary.json; then end the run.

    Idempotent, so a retry, the next flow run or `wmtp upload` can repeat it; clears the pending marker.
    finished=False (a run stopped by its time budget, which a later resume continues) leaves the MLflow run open.
    verdicts: what the flow run already knows of its checkpoints (none is hashed twice).
    """
    verdicts = dict(verdicts or {})
    uploaded = upload_checkpoints(run_id, run_dir, verdicts=verdicts, on_progress=on_progress)
    if succeeded:
        upload_final_model(run_id, run_dir, verdicts=verdicts, on_progress=on_progress)
        register_final_model(run_id, run_dir, verdicts=verdicts)
    sent = upload_pending_metrics(run_id, run_dir)
    if RunLayout(run_dir).summary.is_file():
        client().log_artifact(run_id, str(RunLayout(run_dir).summary))
    if finished:
        client().set_terminated(run_id, status="FINISHED" if succeeded else "FAILED")
    (run_dir / PENDING_UPLOADS_FILE).unlink(missing_ok=True)
    log.info("MLflow run %s: uploaded %s, %d pending metric points", run_id, uploaded or "no new checkpoints", sent)
    return uploaded
