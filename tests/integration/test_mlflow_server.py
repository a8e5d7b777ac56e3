"""Tracking against a real `mlflow server` on loopback: what a run logs, and Phase 3's behaviour when it goes down.

The outages are cut between the run and the server (support.fault_proxy): to the run the server is gone (connections
refused, requests in flight reset), and it is back the moment the test says so, where a restarted server would take
about 16 s, which the run had to outlast.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file
from support.cli import WMTP, wmtp_environment
from support.fault_proxy import FaultProxy

from wmtp_core.checkpoint.final_model import load_final_model
from wmtp_core.config import Recipe

# The default-size model (about 0.2 s a step on two cores): training goes on for about 10 s after the cut at step 6,
# longer than the first failed send takes (metrics are sent every 5 s); a run that ends cut off owes its uploads.
OUTAGE_TRAIN = dict(max_steps=60, log_every=2, save_every=20, eval_every=30, warmup_steps=5)

pytestmark = pytest.mark.slow


def _recipe_file(tmp_path, base, **train):
    recipe = base.model_copy(update={"train": base.train.model_copy(update=train)})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_checkpoints_uploaded_intact(mlflow: MlflowClient, run_id: str, run_dir: Path, tmp_path: Path) -> None:
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert checkpoints
    for checkpoint in checkpoints:
        for file in checkpoint.iterdir():
            remote = mlflow.download_artifacts(
                run_id, f"checkpoints/{checkpoint.name}/{file.name}", str(tmp_path / "dl")
            )
            assert _sha256(Path(remote)) == _sha256(file), file


def test_flow_run_logs_params_metric_histories_and_artifacts(
    tmp_path, tiny_recipe, prefect_api_url, mlflow_server, run_wmtp
):
    recipe = _recipe_file(tmp_path, tiny_recipe, max_steps=6, log_every=1, save_every=3, eval_every=3)
    summary = run_wmtp(
        ["train", "--recipe", str(recipe), "--set", "run.name=served"],
        home=tmp_path / "home",
        api_url=prefect_api_url,
        mlflow_uri=mlflow_server.uri,
    )
    mlflow = MlflowClient(mlflow_server.uri)
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["model.d_model"] == "32" and run.data.params["train.max_steps"] == "6"
    assert run.data.tags["env.cpu_count"] and run.data.tags["prefect.flow_run_id"]
    for metric in ("loss", "lr", "grad_norm", "tokens_per_s", "ce_head_0", "ce_head_1", "weight_entropy"):
        assert [m.step for m in mlflow.get_metric_history(run.info.run_id, metric)] == [1, 2, 3, 4, 5, 6], metric
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "eval_loss")] == [0, 3, 6]
    run_dir = tmp_path / "home" / "runs" / "served"
    assert_checkpoints_uploaded_intact(mlflow, run.info.run_id, run_dir, tmp_path)
    assert run.info.status == "FINISHED"
    exported = mlflow.download_artifacts(run.info.run_id, "final_model", str(tmp_path / "final"))
    model = load_final_model(Path(exported))
    trained = load_file(run_dir / "checkpoints" / "step_00000006" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in trained.items())


@pytest.fixture
def cuttable(mlflow_server):
    """The module's MLflow server behind a FaultProxy: runs log through it, the test cuts and restores it."""
    proxy = FaultProxy(mlflow_server.port)
    yield proxy
    proxy.close()


def _outage_run_logging(tmp_path, name: str, *, phases_api: str, api_url: str, server, proxy) -> tuple:
    """`wmtp train` of an OUTAGE_TRAIN run in the background, logging through proxy, once MLflow has its step-6
    loss: (process, run_dir, mlflow_run_id)."""
    recipe = _recipe_file(tmp_path, Recipe(), **OUTAGE_TRAIN)
    run_dir = tmp_path / "home" / "runs" / name
    process = _start_training(tmp_path, recipe, name=name, api_url=api_url, uri=proxy.uri, phases_api=phases_api)
    return process, run_dir, _wait_for_logged_step(server, run_dir, 6, process)


def _start_training(tmp_path, recipe, *, name, api_url, uri, phases_api):
    args = [
        WMTP,
        "train",
        "--recipe",
        str(recipe),
        "--set",
        f"run.name={name}",
        "--set",
        f"phases.api={phases_api}",
        "--json",
    ]
    env = _async_logging(wmtp_environment(tmp_path / "home", api_url=api_url, mlflow_uri=uri))
    log = (tmp_path / f"{name}.stderr").open("w")
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=log, text=True)


def _async_logging(env: dict[str, str]) -> dict[str, str]:
    """MLflow's documented async mode, under which a plain log_batch returns before anything is sent."""
    return {**env, "MLFLOW_ENABLE_ASYNC_LOGGING": "true"}


def _wmtp(tmp_path, uri: str, *args: str, api_url: str | None = None) -> None:
    env = _async_logging(wmtp_environment(tmp_path / "home", api_url=api_url, mlflow_uri=uri))
    subprocess.run([WMTP, *args], env=env, check=True, timeout=300)


def _wait_for_logged_step(server, run_dir: Path, step: int, process, timeout_s: float = 240) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        tracking = run_dir / "tracking.json"
        if tracking.is_file():
            run_id = json.loads(tracking.read_text())["mlflow_run_id"]
            history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
            if history and max(m.step for m in history) >= step:
                return run_id
        time.sleep(0.5)
    raise AssertionError(f"training never logged step {step}")


def test_server_outage_loses_no_metrics_or_checkpoints_with_phase3(tmp_path, prefect_api_url, mlflow_server, cuttable):
    process, run_dir, run_id = _outage_run_logging(
        tmp_path, "outage", phases_api="true", api_url=prefect_api_url, server=mlflow_server, proxy=cuttable
    )
    cuttable.cut()
    stderr = tmp_path / "outage.stderr"
    _wait_for(lambda: "metrics not sent" in stderr.read_text(), process, "a failed send")  # the outage hit training
    cuttable.restore()
    stdout, _ = process.communicate(timeout=600)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert process.returncode == 0 and summary["status"] == "completed", stderr.read_text()[-2000:]
    _wmtp(tmp_path, cuttable.uri, "upload", "outage")  # what the run still owes, if anything
    mlflow = MlflowClient(mlflow_server.uri)
    assert [m.step for m in mlflow.get_metric_history(run_id, "loss")] == list(
        range(2, OUTAGE_TRAIN["max_steps"] + 1, 2)
    )
    assert not (run_dir / "pending_metrics.jsonl").exists()
    assert_checkpoints_uploaded_intact(mlflow, run_id, run_dir, tmp_path)


def test_server_outage_fails_the_run_on_the_legacy_tracking_path(tmp_path, prefect_api_url, mlflow_server, cuttable):
    process, _, _ = _outage_run_logging(
        tmp_path, "legacy", phases_api="false", api_url=prefect_api_url, server=mlflow_server, proxy=cuttable
    )
    cuttable.cut()
    stdout, _ = process.communicate(timeout=600)
    assert process.returncode == 1
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "failed"


def _saved(run_dir: Path) -> set[Path]:
    return set((run_dir / "checkpoints").glob("step_*/manifest.json"))


def _wait_for(condition, process, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"training ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_trainer_killed_during_an_outage_then_resumed_and_uploaded_misses_no_step(
    tmp_path, prefect_api_url, mlflow_server, cuttable
):
    process, run_dir, run_id = _outage_run_logging(
        tmp_path, "killed", phases_api="true", api_url=prefect_api_url, server=mlflow_server, proxy=cuttable
    )
    cuttable.cut()
    stderr = tmp_path / "killed.stderr"
    _wait_for(lambda: "metrics not sent" in stderr.read_text(), process, "a failed send")
    # A checkpoint saved during the outage: the steps logged before it are never trained (or logged) again.
    before = _saved(run_dir)
    _wait_for(lambda: _saved(run_dir) - before, process, "a checkpoint saved in the outage", timeout_s=600)
    process.kill()  # SIGKILL: no close(), no finally
    process.wait()
    cuttable.restore()
    _wmtp(tmp_path, cuttable.uri, "resume", "killed", api_url=prefect_api_url)
    _wmtp(tmp_path, cuttable.uri, "upload", "killed")
    steps = {m.step for m in MlflowClient(mlflow_server.uri).get_metric_history(run_id, "loss")}
    assert sorted(set(range(2, OUTAGE_TRAIN["max_steps"] + 1, 2)) - steps) == []
