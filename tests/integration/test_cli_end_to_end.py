"""The `wmtp` console script as users run it: the default first run, resume giving the same weights, and Ctrl-C
stopping a run with a checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file
from support.cli import WMTP, wmtp_environment
from support.training import plan_and_train

from wmtp_core.recipes import load_recipe

pytestmark = pytest.mark.slow


def test_default_train_command_succeeds_on_a_fresh_home(tmp_path, run_wmtp):
    """`wmtp train` with nothing set: its own temporary Prefect server, the built-in data and model."""
    home = tmp_path / "fresh"
    summary = run_wmtp(["train"], home=home, fresh=True)  # its MLflow store made by this first run
    assert summary["status"] == "completed"
    assert summary["final_eval_loss"] <= 0.8 * summary["initial_eval_loss"]
    assert (Path(summary["latest_checkpoint"]) / "manifest.json").is_file()
    mlflow = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.algorithm"] == "baseline-mtp"
    assert mlflow.get_metric_history(run.info.run_id, "loss")
    assert mlflow.list_artifacts(run.info.run_id, "checkpoints")
    assert (home / "prefect").is_dir()  # the Prefect database lives under $WMTP_HOME too


def test_resume_reaches_the_same_weights_as_a_straight_run(tmp_path, tiny_recipe, prefect_api_url, run_wmtp):
    """`wmtp train` stopped at step 4, then `wmtp resume` to step 8: the weights of an uninterrupted 8-step run of the
    recipe (trained in this process: the training code is the same, only the resume goes through the CLI)."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe.model_dump(mode="json")))
    eight_steps = ["train.max_steps=8", "train.lr_decay_steps=8"]
    home = tmp_path / "home"
    split = run_wmtp(
        [
            "train",
            "--recipe",
            str(recipe),
            *[f"--set={s}" for s in [*eight_steps, "run.name=split", "train.max_steps=4"]],
        ],
        home=home,
        api_url=prefect_api_url,
    )
    resumed = run_wmtp(["resume", "split", "--set", "train.max_steps=8"], home=home, api_url=prefect_api_url)
    straight = load_recipe(recipe, eight_steps)
    expected_run = plan_and_train(straight, tmp_path / "straight")
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == expected_run.steps == 8
    assert resumed["mlflow_run_id"] == split["mlflow_run_id"]  # the resume continues the run's MLflow run
    expected = load_file(Path(expected_run.latest_checkpoint) / "model.safetensors")
    actual = load_file(Path(resumed["latest_checkpoint"]) / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_ctrl_c_saves_stops_and_exits_130_saying_how_to_continue(tmp_path, tiny_recipe, prefect_api_url):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe.model_dump(mode="json")))
    home = tmp_path / "home"
    long_run = ["train.max_steps=5000", "train.save_every=20", "train.eval_every=100000"]
    command = [WMTP, "train", "--recipe", str(recipe), "-n", "pressed", *[f"--set={s}" for s in long_run]]
    env = wmtp_environment(home, api_url=prefect_api_url)
    cli = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_save = home / "runs" / "pressed" / "checkpoints" / "step_00000020"
    deadline = time.monotonic() + 120
    while not first_save.exists() and cli.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    cli.send_signal(signal.SIGINT)
    _, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 130, stderr[-3000:]
    summary = json.loads((home / "runs" / "pressed" / "summary.json").read_text())
    assert (summary["status"], summary["stop_reason"]) == ("stopped", "Ctrl-C")
    assert 20 <= summary["steps"] < 5000 and Path(summary["latest_checkpoint"]).name == f"step_{summary['steps']:08d}"
    assert f"stopped by Ctrl-C at step {summary['steps']}" in stderr and "wmtp resume pressed" in stderr
