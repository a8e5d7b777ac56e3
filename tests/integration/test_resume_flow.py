"""The wmtp-resume flow (and wmtp-train from another run's checkpoint) on the tiny model against the session's Prefect
test server: a branch, no checkpoint, already complete, a time budget per invocation, and a training failure that the
task retry resumes from its last save; a whole resume hashes its checkpoint once. Where a run resumes from:
tests/unit/test_start_point.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.hashing import HashedBytes

import tasks.training
from flows.resume import wmtp_resume
from flows.train import wmtp_train
from tasks.reporting import TrainingProgress
from wmtp_core.checkpoint.manifest import checkpoint_bytes, read_manifest

pytestmark = pytest.mark.slow


def _train_4_steps(recipe, name):
    """A finished 4-step run (checkpoints at 2 and 4), without MLflow: the resume logic is what is under test."""
    recipe = recipe.model_copy(
        update={
            "run": recipe.run.model_copy(update={"name": name}),
            "tracking": recipe.tracking.model_copy(update={"enabled": False}),
        }
    )
    state = wmtp_train(recipe=recipe, return_state=True)
    assert state.is_completed(), state.message


def _summary(home, name):
    return json.loads((home / "runs" / name / "summary.json").read_text())


def _flow_run_records(flow_run_id, prefect_client_call):
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # records are sent in the background; send what is queued first
    with get_client(sync_client=True) as client:
        return prefect_client_call(client, flow_run_id)


def _logs(client, flow_run_id):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def _artifacts(client, flow_run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    return client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )


def test_a_branch_trains_on_from_another_runs_checkpoint(prefect_api_url, wmtp_home, tiny_recipe):
    _train_4_steps(tiny_recipe, "source")
    source_step_2 = wmtp_home / "runs" / "source" / "checkpoints" / "step_00000002"
    branch = tiny_recipe.model_copy(
        update={
            "run": tiny_recipe.run.model_copy(update={"name": "branch"}),
            "tracking": tiny_recipe.tracking.model_copy(update={"enabled": False}),
        }
    )
    state = wmtp_train(recipe=branch, resume=str(source_step_2), return_state=True)
    assert state.is_completed(), state.message
    summary = _summary(wmtp_home, "branch")
    assert (summary["resumed_from_step"], summary["steps"]) == (2, 4)
    assert sorted(p.name for p in (wmtp_home / "runs" / "branch" / "checkpoints").iterdir()) == ["step_00000004"]


def test_resume_of_a_run_without_a_checkpoint_fails_and_says_so(prefect_api_url, wmtp_home):
    state = wmtp_resume(run_name="never-trained", return_state=True)
    assert state.is_failed()
    assert "run 'never-trained' has no valid checkpoint" in state.message and "wmtp-train" in state.message


def test_resume_of_a_complete_run_completes_at_once_with_a_message(prefect_api_url, wmtp_home, tiny_recipe):
    _train_4_steps(tiny_recipe, "done")
    state = wmtp_resume(run_name="done", return_state=True)
    assert state.is_completed()
    assert state.message == "run 'done' is already complete: step 4 of 4; nothing to train"


def test_time_budget_stops_at_a_checkpoint_and_the_next_resume_finishes_the_run(
    prefect_api_url, wmtp_home, tiny_recipe
):
    _train_4_steps(tiny_recipe, "budgeted")
    stopped = wmtp_resume(run_name="budgeted", target_steps=8, budget_minutes=1e-6, return_state=True)
    assert stopped.is_completed() and stopped.message.startswith("stopped by the time budget at step 5 of 8")
    summary = _summary(wmtp_home, "budgeted")
    assert (summary["status"], summary["steps"], summary["stop_reason"]) == ("stopped", 5, "time budget")
    assert summary["latest_checkpoint"].endswith("step_00000005")
    artifacts = {a.key: a for a in _flow_run_records(stopped.state_details.flow_run_id, _artifacts)}
    assert artifacts["wmtp-progress-budgeted"].data == 62.5  # 5 of 8 steps
    steps_listed = [row["step"] for row in json.loads(artifacts["wmtp-checkpoints-budgeted"].data)]
    assert steps_listed == [2, 4, 5]

    finished = wmtp_resume(run_name="budgeted", target_steps=8, return_state=True)
    assert finished.is_completed(), finished.message
    summary = _summary(wmtp_home, "budgeted")
    assert (summary["status"], summary["resumed_from_step"], summary["steps"]) == ("completed", 5, 8)


class FailOnceAtStep7(TrainingProgress):
    """The progress callback, failing once at step 7, after the step-6 save: training dies mid-run on its first
    attempt."""

    failures = 0

    def __call__(self, step, metrics):
        if step == 7 and "loss" in metrics and FailOnceAtStep7.failures == 0:
            FailOnceAtStep7.failures += 1
            raise RuntimeError("injected failure after the step-6 checkpoint")
        super().__call__(step, metrics)


def test_a_training_failure_is_retried_from_the_last_save_and_reaches_the_same_step(
    prefect_api_url, wmtp_home, tiny_recipe, monkeypatch
):
    _train_4_steps(tiny_recipe, "faulty")
    monkeypatch.setattr(tasks.training, "TrainingProgress", FailOnceAtStep7)
    state = wmtp_resume(run_name="faulty", target_steps=8, return_state=True)
    assert FailOnceAtStep7.failures == 1 and state.is_completed(), state.message
    summary = _summary(wmtp_home, "faulty")
    assert (summary["resumed_from_step"], summary["steps"]) == (6, 8)
    logs = _flow_run_records(state.state_details.flow_run_id, _logs)
    messages = [(log.name, log.level, log.message) for log in logs]
    assert any(m.startswith("resuming from") and m.endswith("step_00000006 (step 6)") for _, _, m in messages)
    # the core library's own progress lines reach the run log at INFO
    assert ("wmtp_core.training.loop", 20) in {
        (name, level) for name, level, m in messages if m.startswith("step 8/8 loss")
    }


def test_a_whole_resume_hashes_the_checkpoint_it_loads_once_and_nothing_else(
    prefect_api_url, wmtp_home, tiny_recipe, monkeypatch
):
    """The run plan verifies the newest checkpoint; train_model, the load, upload_checkpoints and upload_final_model
    take its verdict (and the new saves' own) instead of hashing again, with 4 kept checkpoints to tempt them."""
    recipe = tiny_recipe.model_copy(
        update={
            "run": tiny_recipe.run.model_copy(update={"name": "counted"}),
            "train": tiny_recipe.train.model_copy(update={"save_every": 1, "keep_last": 5}),
        }
    )
    assert wmtp_train(recipe=recipe, return_state=True).is_completed()  # steps 1-4, uploaded to MLflow
    hashed = HashedBytes(monkeypatch)
    state = wmtp_resume(run_name="counted", target_steps=6, return_state=True)
    assert state.is_completed(), state.message
    step_4 = wmtp_home / "runs" / "counted" / "checkpoints" / "step_00000004"
    assert hashed.total == checkpoint_bytes(read_manifest(step_4)) and {p.parent for p in hashed.files} == {step_4}
    summary = _summary(wmtp_home, "counted")
    assert (summary["resumed_from_step"], summary["steps"], summary["uploads"]) == (4, 6, "done")
    assert _uploaded_checkpoints(summary["mlflow_run_id"]) == [f"step_{step:08d}" for step in range(1, 7)]


def _uploaded_checkpoints(run_id):
    from mlflow import MlflowClient

    from tracking.client import tracking_uri

    return sorted(Path(a.path).name for a in MlflowClient(tracking_uri()).list_artifacts(run_id, "checkpoints"))
