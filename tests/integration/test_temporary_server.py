"""The CLI starts Prefect's temporary server before torch loads, and the flow run then uses that same server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ROOT
from support.cli import wmtp_environment

EARLY_START = """
import json, sys, time
from flows.temporary_server import default_prefect_environment
from flows.temporary_server import start_temporary_server

default_prefect_environment()  # as `wmtp train` does: Prefect's home under $WMTP_HOME, a generous start-up timeout
from prefect.server.api.server import SubprocessASGIServer

wait = start_temporary_server()
deadline = time.monotonic() + 30
while SubprocessASGIServer().server_process is None and time.monotonic() < deadline:
    time.sleep(0.05)
launched_before_torch = SubprocessASGIServer().server_process is not None and "torch" not in sys.modules
import torch  # what the CLI loads while the server starts
wait()
from prefect import flow
from prefect.client.orchestration import get_client

@flow
def api_url_seen_by_a_flow_run() -> str:
    return str(get_client(sync_client=True).api_url)

print(json.dumps({"launched_before_torch": launched_before_torch, "servers": len(SubprocessASGIServer._instances),
                  "started": SubprocessASGIServer().api_url, "flow_used": api_url_seen_by_a_flow_run()}))
"""


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_the_server_launches_before_torch_loads_and_the_flow_run_uses_it(tmp_path):
    out = _run(EARLY_START, wmtp_environment(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["launched_before_torch"] is True
    assert report["servers"] == 1
    assert report["flow_used"].rstrip("/") == report["started"].rstrip("/")
    assert out.stderr.count("temporary Prefect server on http://127.0.0.1:") == 1  # our words, not Prefect's
    assert "Starting temporary server" not in out.stderr and "Stopping temporary server" not in out.stderr


def test_with_a_server_url_set_nothing_is_started(tmp_path):
    code = (
        "import sys; from flows.temporary_server import start_temporary_server; start_temporary_server()(); "
        "print('prefect.server.api.server' in sys.modules)"
    )
    out = _run(code, wmtp_environment(tmp_path, api_url="http://127.0.0.1:9/api"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"
