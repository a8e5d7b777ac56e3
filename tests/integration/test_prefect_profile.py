"""The user's Prefect configuration is honoured: a real `prefect server` named only by the active profile (no
PREFECT_API_URL in the environment) is where `wmtp train` runs its flow and where `wmtp serve` serves."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from support.cli import WMTP, wmtp_environment
from support.recipes import TINY_OVERRIDES

from benchmarks.servers import PrefectServer, stop_process_group

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """One real server for the module (a start costs 20-40 s on two cores); no test here leaves a flow run behind
    but the train test, which checks the runs."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def profile_env(prefect_server, tmp_path):
    """A user's environment: a PREFECT_HOME whose active profile names the server, and no PREFECT_API_URL."""
    prefect_home = tmp_path / "user-prefect-home"
    prefect_home.mkdir()
    (prefect_home / "profiles.toml").write_text(
        f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{prefect_server.api_url}"\n'
    )
    env = wmtp_environment(tmp_path / "home")
    env["PREFECT_HOME"] = str(prefect_home)
    assert "PREFECT_API_URL" not in env
    return env


def _post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_train_runs_its_named_and_tagged_flow_on_the_server_of_the_active_profile(prefect_server, profile_env):
    overrides = [f"--set={o}" for o in [*TINY_OVERRIDES, "run.name=profiled", "tracking.enabled=false"]]
    out = subprocess.run([WMTP, "train", *overrides], env=profile_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "temporary Prefect server" not in out.stderr
    runs = _post(f"{prefect_server.api_url}/flow_runs/filter", {})
    assert [(run["name"], sorted(run["tags"]), run["state_type"]) for run in runs] == [
        ("train-profiled", ["train", "wmtp-cli"], "COMPLETED")  # named after its work, tagged as a CLI run
    ]
    assert f"Prefect UI: http://127.0.0.1:{prefect_server.port}/flow-runs/flow-run/{runs[0]['id']}" in out.stderr


def test_serve_serves_on_the_server_of_the_active_profile(prefect_server, profile_env, tmp_path):
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [WMTP, "serve"], env=profile_env, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        names: set[str] = set()
        while len(names) < 3 and time.monotonic() < deadline:
            assert process.poll() is None, Path(log).read_text()[-3000:]
            names = {d["name"] for d in _post(f"{prefect_server.api_url}/deployments/filter", {})}
            time.sleep(1)
        assert names == {"manual", "scheduled", "verify"}, Path(log).read_text()[-3000:]
    finally:
        stop_process_group(process, signal.SIGTERM, grace_s=10)
