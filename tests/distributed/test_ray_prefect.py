"""The Prefect path onto a Ray cluster: `wmtp train --set devices.launcher=ray` with RAY_ADDRESS, where the training
task's Prefect retry resumes a job that lost a node past ray.max_failures, and the `wmtp-train/manual` deployment
run from the UI form's parameters (the recipe naming the cluster)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support import ROOT
from support.cli import WMTP, wmtp_environment
from support.prefect import deployment_named, finished_run
from support.ray_cluster import lose_a_node_after_step_6, rank_logs, wait_for
from support.recipes import TINY_OVERRIDES

from benchmarks.servers import RAY_LOOPBACK_ONLY, free_port, stop_process_group
from wmtp_core.layout import RunLayout
from wmtp_core.recipes import load_recipe

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
RAY = str(Path(sys.executable).parent / "ray")
ON_RAY = ["devices.launcher=ray", "devices.strategy=ddp", "ray.workers=2", "devices.timeout_s=60"]


def test_a_prefect_retry_resumes_a_ray_job_that_lost_a_node_past_its_allowed_failures(
    ray_cluster, tmp_path, prefect_api_url
):
    home = tmp_path / "home"
    env = wmtp_environment(home, api_url=prefect_api_url) | {"RAY_ADDRESS": ray_cluster.address} | RAY_LOOPBACK_ONLY
    steps = ["train.max_steps=60", "train.save_every=6", "train.eval_every=1000", "ray.max_failures=0"]
    settings = [arg for key in [*TINY_OVERRIDES, *ON_RAY, *steps, "run.name=lost"] for arg in ("--set", key)]
    train = subprocess.Popen(
        [WMTP, "train", *settings, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run_dir = home / "runs" / "lost"
    stdout, stderr = lose_a_node_after_step_6(ray_cluster, train, run_dir, timeout=400)
    assert train.returncode == 0, stderr[-4000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["status"], summary["steps"]) == ("completed", 60)
    assert summary["resumed_from_step"] >= 6  # the retry resumed from the newest checkpoint, not from step 0
    jobs = {log.parent.parent.name for log in rank_logs(run_dir)}
    assert len(jobs) == 2, jobs  # two Ray jobs: the first failed (no restart allowed), the task's retry ran the second


def test_the_one_machine_steps_of_the_docs_run_the_train_deployment_from_the_forms_parameters(
    tmp_path, prefect_api_url
):
    """docs/ray.md, "A cluster on one machine": `ray start --head` (kept on loopback), then the wmtp-train/manual
    deployment run with the form's recipe naming the cluster. The head is stopped by killing its process group, not
    by `ray stop`, which would stop every Ray process on the machine (the session's own cluster too)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port, home = free_port(), tmp_path / "home"
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={ray_temp}",
            "--disable-usage-stats",
        ],
        env=os.environ | RAY_LOOPBACK_ONLY,
        stdout=(tmp_path / "head.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # Every Ray process on loopback, the driver too: without it Ray looks for this machine's node on its interface
    # address, which the head on 127.0.0.1 is not.
    env = wmtp_environment(home, api_url=prefect_api_url) | {"PREFECT_RUNNER_POLL_FREQUENCY": "1"} | RAY_LOOPBACK_ONLY
    serving = subprocess.Popen(
        [WMTP, "serve"],
        cwd=ROOT,
        env=env,
        stdout=(tmp_path / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    recipe = load_recipe(None, [*TINY_OVERRIDES, *ON_RAY, f"ray.address=127.0.0.1:{port}", "run.name=served"])
    try:
        wait_for(lambda: answers(port), timeout=120)
        with temporary_settings({PREFECT_API_URL: prefect_api_url}), get_client(sync_client=True) as client:
            deployment = deployment_named(client, "wmtp-train/manual")
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"recipe": recipe.model_dump(mode="json")}
            )
            finished = finished_run(client, run.id, timeout_s=300)
    finally:
        stop_process_group(serving, signal.SIGTERM, grace_s=10)
        stop_process_group(head, signal.SIGKILL, grace_s=0)
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert finished.state.is_completed(), finished.state.message
    assert len(rank_logs(home / "runs" / "served")) == 2
    assert RunLayout(home / "runs" / "served").checkpoint(4).is_dir()


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
