"""A tracking URI with credentials (http://user:password@host) against a real `mlflow server` on loopback: the
password reaches no log line, no file under $WMTP_HOME (the Prefect database included), and nothing of the MLflow
run; and a run started while the tracking server is down trains to the end, then `wmtp upload` delivers it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.cli import WMTP, wmtp_environment
from support.recipes import TINY_OVERRIDES

pytestmark = pytest.mark.slow
SECRET = "s3cr3t-pw"


def _with_credentials(uri: str) -> str:
    return uri.replace("http://", f"http://user:{SECRET}@")


def _wmtp(home: Path, uri: str, *args: str, api_url: str | None = None) -> subprocess.CompletedProcess:
    """The real `wmtp` with MLFLOW_TRACKING_URI; without api_url its own temporary Prefect server, whose database
    is under home."""
    env = wmtp_environment(home, api_url=api_url, mlflow_uri=uri)
    return subprocess.run([WMTP, *args], env=env, capture_output=True, text=True, timeout=600)


def _train(home: Path, uri: str, name: str, *, api_url: str | None = None) -> subprocess.CompletedProcess:
    settings = [arg for key in [*TINY_OVERRIDES, f"run.name={name}"] for arg in ("--set", key)]
    return _wmtp(home, uri, "train", *settings, "--json", api_url=api_url)


def _session_prefect_database_dir() -> Path:
    """Where the session's Prefect server (the prefect_api_url fixture) keeps its database."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().removeprefix("sqlite+aiosqlite:///"))
    assert database.is_file(), database
    return database.parent


def _files_holding(secret: str, *roots: Path) -> list[str]:
    """Every file under roots whose bytes contain secret (databases, logs, JSON, artifacts alike)."""
    found = []
    for root in roots:
        found += [str(f) for f in root.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    return found


def _assert_no_secret_in_the_mlflow_run(mlflow: MlflowClient, run_id: str, scratch: Path) -> None:
    run = mlflow.get_run(run_id)
    assert run.data.params and run.data.tags
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if SECRET in f"{k}={v}"]
    downloaded = Path(mlflow.download_artifacts(run_id, "", str(scratch)))
    assert (downloaded / "summary.json").is_file()
    assert _files_holding(SECRET, downloaded) == []


def _output(process: subprocess.CompletedProcess) -> str:
    return process.stdout + process.stderr


def test_a_password_in_the_tracking_uri_reaches_no_log_line_file_prefect_record_or_mlflow_run(tmp_path, mlflow_server):
    home = tmp_path / "home"
    trained = _train(home, _with_credentials(mlflow_server.uri), "secret")
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["uploads"] == "done" and summary["mlflow_link"].startswith(mlflow_server.uri)
    assert SECRET not in _output(trained)
    assert (home / "prefect" / "prefect.db").is_file()  # the flow run's records, logs and results
    assert _files_holding(SECRET, home, Path(f"{home}-prefect-home")) == []
    _assert_no_secret_in_the_mlflow_run(MlflowClient(mlflow_server.uri), summary["mlflow_run_id"], tmp_path / "dl")


def test_a_run_started_while_the_tracking_server_is_down_trains_to_the_end_and_wmtp_upload_delivers_it_later(
    tmp_path, mlflow_server, prefect_api_url
):
    home, uri = tmp_path / "home", _with_credentials(mlflow_server.uri)
    mlflow_server.stop()
    trained = _train(home, uri, "offline", api_url=prefect_api_url)  # the session's server: its database scanned
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["uploads"] == "pending"
    spooled = [line for line in trained.stderr.splitlines() if "tracking spooled" in line]
    assert spooled and "unreachable" in spooled[0] and "`wmtp upload offline`" in spooled[0], trained.stderr[-3000:]
    refused = _wmtp(home, uri, "upload", "offline")  # the server is still down: one line, the run stays owed
    assert refused.returncode == 1 and "Traceback" not in _output(refused)
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")], refused.stderr[-2000:]

    mlflow_server.start()
    delivered = _wmtp(home, uri, "upload", "offline")
    assert delivered.returncode == 0, delivered.stderr[-3000:]
    run_dir = home / "runs" / "offline"
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    mlflow = MlflowClient(mlflow_server.uri)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "4"
    assert run.data.tags["prefect.flow_run_id"] and run.data.tags["env.cpu_count"]  # as if opened at the start
    assert [m.step for m in mlflow.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert {a.path for a in mlflow.list_artifacts(run_id, "checkpoints")} == {
        "checkpoints/step_00000002",
        "checkpoints/step_00000004",
    }
    assert not (run_dir / "pending_uploads.json").exists() and not (run_dir / "pending_metrics.jsonl").exists()
    delivered_summary = json.loads((run_dir / "summary.json").read_text())
    assert delivered_summary["uploads"] == "done" and delivered_summary["mlflow_run_id"] == run_id
    outputs = _output(trained) + _output(refused) + _output(delivered)
    assert SECRET not in outputs and "Traceback" not in outputs
    scanned = [home, Path(f"{home}-prefect-home"), _session_prefect_database_dir()]
    assert _files_holding(SECRET, *scanned) == []
    _assert_no_secret_in_the_mlflow_run(mlflow, run_id, tmp_path / "dl")
