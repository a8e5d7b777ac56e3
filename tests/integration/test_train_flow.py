"""The wmtp-train flow end to end on the tiny model, against the session's Prefect test server and a real
(embedded SQLite) MLflow store."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from support.prefect import flow_run_artifact_keys

import tasks.training
from flows.train import wmtp_train
from tracking.client import PENDING_UPLOADS_FILE, MetricsSink, tracking_uri
from wmtp_core.checkpoint.manifest import list_checkpoints
from wmtp_core.config import PhaseGates

pytestmark = pytest.mark.slow


def _summary(home, run_name):
    return json.loads((home / "runs" / run_name / "summary.json").read_text())


def _named(recipe, name, **train):
    return recipe.model_copy(
        update={
            "run": recipe.run.model_copy(update={"name": name}),
            "train": recipe.train.model_copy(update=train),
        }
    )


def _artifacts(run_id, path=None):
    return sorted(a.path for a in MlflowClient(tracking_uri()).list_artifacts(run_id, path))


def test_train_flow_checkpoints_logs_and_summarises(prefect_api_url, wmtp_home, tiny_recipe):
    state = wmtp_train(recipe=_named(tiny_recipe, "flow-ok"), return_state=True)
    assert state.is_completed(), state.message
    summary = _summary(wmtp_home, "flow-ok")
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["mlflow_run_id"] in summary["mlflow_link"]
    assert [c.step for c in list_checkpoints(wmtp_home / "runs" / "flow-ok")] == [2, 4]
    mlflow = MlflowClient(tracking_uri())
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.max_steps"] == "4" and run.data.params["phases.checkpoint"] == "True"
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "eval_loss")] == [0, 2, 4]
    assert _artifacts(run.info.run_id, "checkpoints") == ["checkpoints/step_00000002", "checkpoints/step_00000004"]
    assert "summary.json" in _artifacts(run.info.run_id)
    assert sorted(flow_run_artifact_keys(state)) == [
        "wmtp-checkpoints-flow-ok",
        "wmtp-progress-flow-ok",
        "wmtp-summary-flow-ok",
    ]


def test_a_sharded_run_ends_its_mlflow_run_with_a_final_model_and_owes_no_uploads(
    prefect_api_url, wmtp_home, tiny_recipe
):
    recipe = _named(tiny_recipe, "flow-sharded")
    recipe = recipe.model_copy(update={"checkpoint": recipe.checkpoint.model_copy(update={"format": "sharded"})})
    state = wmtp_train(recipe=recipe, return_state=True)
    assert state.is_completed(), state.message
    run_id = _summary(wmtp_home, "flow-sharded")["mlflow_run_id"]
    assert MlflowClient(tracking_uri()).get_run(run_id).info.status == "FINISHED"
    ours = {"final_model/model.safetensors", "final_model/model_config.json"}  # beside them, MLflow's (MLmodel, data)
    assert ours | {"final_model/MLmodel", "final_model/data"} <= set(_artifacts(run_id, "final_model"))
    assert not (wmtp_home / "runs" / "flow-sharded" / PENDING_UPLOADS_FILE).exists()


def test_phases_parameter_overrides_the_recipe_and_legacy_checkpoint_fails_with_one_line(
    prefect_api_url, wmtp_home, tiny_recipe
):
    state = wmtp_train(recipe=_named(tiny_recipe, "legacy"), phases=PhaseGates(checkpoint=False), return_state=True)
    assert state.is_failed()
    summary = _summary(wmtp_home, "legacy")
    assert summary["status"] == "failed" and summary["phases"]["checkpoint"] is False
    assert "KeyError(None)" in summary["reason"] and "\n" not in summary["reason"]
    assert state.message == summary["reason"]
    assert MlflowClient(tracking_uri()).get_run(summary["mlflow_run_id"]).info.status == "FAILED"


class FailOnceAtStep3(MetricsSink):
    """A metrics callback that raises once at step 3, after the step-2 checkpoint: a crash in the middle of training."""

    failed = False

    def __call__(self, step, metrics):
        if step == 3 and "loss" in metrics and not FailOnceAtStep3.failed:
            FailOnceAtStep3.failed = True
            raise RuntimeError("injected failure after the step-2 checkpoint")
        super().__call__(step, metrics)


def test_training_retry_resumes_from_the_newest_checkpoint(prefect_api_url, wmtp_home, tiny_recipe, monkeypatch):
    monkeypatch.setattr(tasks.training, "metrics_sink", lambda run_id, run_dir, safe: FailOnceAtStep3(run_id))
    state = wmtp_train(recipe=_named(tiny_recipe, "retried"), return_state=True)
    assert FailOnceAtStep3.failed and state.is_completed(), state.message
    summary = _summary(wmtp_home, "retried")
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    losses = MlflowClient(tracking_uri()).get_metric_history(summary["mlflow_run_id"], "loss")
    assert sorted({m.step for m in losses}) == [1, 2, 3, 4]


def test_resume_continues_the_same_mlflow_run(prefect_api_url, wmtp_home, tiny_recipe):
    first = wmtp_train(recipe=_named(tiny_recipe, "continued"), return_state=True)
    assert first.is_completed()
    longer = _named(tiny_recipe, "continued", max_steps=6)
    second = wmtp_train(recipe=longer, resume="latest", return_state=True)
    assert second.is_completed(), second.message
    summary = _summary(wmtp_home, "continued")
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6
    assert summary["mlflow_run_id"] == first.result()["mlflow_run_id"]
    losses = MlflowClient(tracking_uri()).get_metric_history(summary["mlflow_run_id"], "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
