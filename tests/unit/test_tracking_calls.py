"""The MLflow calls themselves: synchronous even with MLflow's async logging on, no process-wide HTTP timeout, and
the context tags (user, source, git commit) on a new run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from benchmarks.servers import free_port
from tracking import artifacts
from tracking import client as tracking


@pytest.fixture
def async_logging(monkeypatch, wmtp_home):
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "true")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    return wmtp_home


def test_sent_points_are_stored_when_send_returns_even_with_async_logging(async_logging, tiny_recipe):
    run_id = tracking.open_tracking_run(tiny_recipe, async_logging, run_name="sync", extra_tags={})
    tracking.point_sender(run_id)([("loss", 0.5, 1000, 1), ("loss", 0.25, 2000, 2)])
    history = MlflowClient(tracking.tracking_uri()).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]


def test_a_send_to_a_dead_server_raises_instead_of_returning(async_logging, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception, match="Connection refused|Max retries|Failed to establish"):
        tracking.point_sender("0" * 32)([("loss", 0.5, 1000, 1)])


def test_no_process_wide_http_timeout_bounds_artifact_uploads(async_logging):
    tracking.client()
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_a_new_run_carries_user_source_and_git_commit_tags(async_logging, tiny_recipe):
    run_id = tracking.open_tracking_run(tiny_recipe, async_logging, run_name="tagged", extra_tags={"x": "y"})
    tags = MlflowClient(tracking.tracking_uri()).get_run(run_id).data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["x"] == "y"


@pytest.fixture
def trained_run(wmtp_home, tiny_recipe):
    """A run directory with two valid checkpoints (steps 2 and 4) and its MLflow run in the embedded store."""
    from support.training import plan_and_train

    recipe = tiny_recipe.model_copy(
        update={"train": tiny_recipe.train.model_copy(update={"max_steps": 4, "save_every": 2})}
    )
    run_dir = wmtp_home / "runs" / "uploaded"
    plan_and_train(recipe, run_dir)
    return run_dir, tracking.open_tracking_run(recipe, run_dir, run_name="uploaded", extra_tags={})


def test_a_checkpoint_upload_cut_short_before_its_manifest_is_redone_whole(trained_run):
    run_dir, run_id = trained_run
    mlflow = MlflowClient(tracking.tracking_uri())
    cut_short = run_dir / "checkpoints" / "step_00000002"
    mlflow.log_artifact(run_id, str(cut_short / "model.safetensors"), "checkpoints/step_00000002")  # no manifest
    assert artifacts.upload_checkpoints(run_id, run_dir) == ["step_00000002", "step_00000004"]
    sent = {Path(a.path).name for a in mlflow.list_artifacts(run_id, "checkpoints/step_00000002")}
    assert sent == {p.name for p in cut_short.iterdir()}
    assert artifacts.upload_checkpoints(run_id, run_dir) == []  # complete now: nothing sent twice


def test_upload_progress_counts_every_byte_once_and_ends_at_the_total(trained_run):
    run_dir, run_id = trained_run
    reports: list[tuple[str, int, int]] = []
    artifacts.upload_checkpoints(run_id, run_dir, on_progress=lambda *report: reports.append(report))
    on_disk = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file())
    done = [report[1] for report in reports]
    assert done == sorted(done) and done[-1] == reports[-1][2] == on_disk
    assert {report[0] for report in reports} == {"uploading checkpoints"}
