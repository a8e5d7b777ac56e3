"""What the `wmtp` commands tell a person: the checkpoints table has a header, `upload` says whether it closed the
MLflow run, `train` ends with next steps that are real commands, and a pass@k of 0 from the built-in model is said to
be expected."""

from __future__ import annotations

import json
import re

import pytest
import typer
from typer.testing import CliRunner

from deployments.cli import app, next_steps
from deployments.cli_evaluation import BUILTIN_ZERO_NOTE, print_report
from wmtp_core.checkpoint.storage import save_checkpoint
from wmtp_core.config import PhaseGates

runner = CliRunner()

REPORT = {
    "step": 150,
    "benchmark": "builtin",
    "problems": 10,
    "samples": 1,
    "heads": 1,
    "pass_at_k": {"1": 0.0},
    "per_head": [],
    "decoding": {"tokens_per_s": 100.0, "acceptance_per_head": []},
    "directory": "/x",
}


def test_the_checkpoints_table_starts_with_its_header(wmtp_home):
    run = wmtp_home / "runs" / "listed"
    save_checkpoint(run, step=1, model_state={}, train_state={}, manifest_extra={})
    result = runner.invoke(app, ["checkpoints", "listed"])
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split() == ["step", "status", "path"] and row.split()[:2] == ["1", "valid"]


def test_the_next_steps_after_training_are_commands_that_exist():
    commands = set(typer.main.get_command(app).commands)
    hint = next_steps("demo")
    named = re.findall(r"uv run wmtp ([a-z-]+)", hint)
    assert {"evaluate", "generate"} <= set(named) and set(named) <= commands
    assert "wmtp evaluate demo" in hint and "Compare" in hint


@pytest.mark.parametrize(
    ("builtin", "pass_at_1", "noted"), [(True, 0.0, True), (True, 0.2, False), (False, 0.0, False)]
)
def test_a_zero_pass_at_k_of_the_builtin_model_is_said_to_be_expected(capsys, builtin, pass_at_1, noted):
    print_report({**REPORT, "pass_at_k": {"1": pass_at_1}}, as_json=False, builtin_model=builtin)
    [line] = [line for line in capsys.readouterr().out.splitlines() if "pass@1" in line]
    assert (BUILTIN_ZERO_NOTE in line) is noted


def test_upload_says_whether_it_closed_the_mlflow_run(wmtp_home):
    """A completed run's MLflow run is closed; a stopped one (resumed later into the same MLflow run) is left open."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    from tracking.client import client

    mlflow = client()
    assert not MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get()  # our bars only: no tqdm "Downloading artifacts"
    experiment = mlflow.create_experiment("owed")
    for status, said, mlflow_status in [
        ("completed", "closed it as FINISHED", "FINISHED"),
        ("stopped", "left it open", "RUNNING"),
    ]:
        run_dir = wmtp_home / "runs" / status
        run_dir.mkdir(parents=True)
        run_id = mlflow.create_run(experiment).info.run_id
        (run_dir / "tracking.json").write_text(json.dumps({"mlflow_run_id": run_id}))
        summary = {"run_name": status, "run_dir": str(run_dir), "status": status, "phases": PhaseGates().model_dump()}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        result = runner.invoke(app, ["upload", status])
        assert result.exit_code == 0, result.output
        assert said in result.stdout and mlflow.get_run(run_id).info.status == mlflow_status
