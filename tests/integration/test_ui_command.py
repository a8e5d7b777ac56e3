"""`wmtp ui` after two CLI runs: both flow runs in the Prefect API and both MLflow runs at the printed URLs, and
Ctrl-C stops both servers with every process they started; servers the user configured are named, not started."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from support.cli import WMTP, run_wmtp_json, wmtp_environment
from support.recipes import TINY_OVERRIDES

from deployments.server_processes import free_port
from deployments.ui import choose_port

URL_LINE = re.compile(r"^(Prefect|MLflow) UI: (http://127\.0\.0\.1:\d+)(\S*)$")


@pytest.mark.slow
def test_ui_shows_every_cli_run_and_stops_cleanly_on_ctrl_c(tmp_path):
    home = tmp_path / "home"
    tiny = [f"--set={override}" for override in TINY_OVERRIDES]
    # No api_url: each run starts its own temporary server, as a user's `wmtp train` does, over $WMTP_HOME's database.
    runs = {}
    for name in ("first", "second"):
        out, runs[name] = run_wmtp_json(["train", "-n", name, *tiny], home=home)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "`uv run wmtp ui`" in out.stderr and "prefect config set" not in out.stderr  # the end-of-run hint
    ports = [free_port(), free_port()]
    ui = subprocess.Popen(
        [WMTP, "ui", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1])],
        env=wmtp_environment(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    groups: list[int] = []
    try:
        urls = _printed_urls(ui, timeout_s=300)
        assert urls == {"Prefect": f"http://127.0.0.1:{ports[0]}", "MLflow": f"http://127.0.0.1:{ports[1]}"}
        flow_runs = _post(f"{urls['Prefect']}/api/flow_runs/filter", {})
        assert {"train-first", "train-second"} <= {run["name"] for run in flow_runs}
        assert all("wmtp-cli" in run["tags"] for run in flow_runs)
        assert _mlflow_run_ids(urls["MLflow"]) == {summary["mlflow_run_id"] for summary in runs.values()}
        groups = _children(ui.pid)
        assert len(groups) == 2 and all(_group_members(group) for group in groups)
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=60) == 0, ui.stderr.read()[-3000:]
    finally:
        _stop_what_is_left(ui, groups)
    assert "Traceback" not in ui.stderr.read()
    assert [group for group in groups if _group_members(group)] == []
    assert [port for port in ports if _listening(port)] == []


@pytest.mark.slow  # a `wmtp` start: about 6 s
def test_ui_points_to_the_servers_the_user_configured_and_starts_none(tmp_path):
    env = wmtp_environment(tmp_path, api_url="http://127.0.0.1:9/api", mlflow_uri="http://127.0.0.1:9")
    out = subprocess.run([WMTP, "ui"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Prefect UI: http://127.0.0.1:9  (your server" in out.stdout
    assert "MLflow UI: http://127.0.0.1:9  (your tracking server, from MLFLOW_TRACKING_URI)" in out.stdout
    assert not (tmp_path / "ui").exists()  # no server started, so no server logs


def test_a_port_asked_for_and_taken_is_refused_and_a_taken_default_falls_back():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} is in use: choose another with --prefect-port"):
            choose_port(port, 4200, "--prefect-port")
        fallback = choose_port(None, port, "--prefect-port")
    assert fallback != port


def _stop_what_is_left(ui: subprocess.Popen, groups: list[int]) -> None:
    """After a failure before the Ctrl-C stopped everything: the ui (which stops its servers), then their groups."""
    groups = groups or _children(ui.pid)
    if ui.poll() is None:
        ui.terminate()
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ui.kill()
            ui.wait()
    for group in groups:
        with contextlib.suppress(ProcessLookupError):  # the usual case: the group ended with its server
            os.killpg(group, signal.SIGKILL)


def _printed_urls(ui: subprocess.Popen, *, timeout_s: float) -> dict[str, str]:
    """The two `NAME UI: URL` lines, read with a deadline (a reader thread: readline alone would block forever)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in ui.stdout], daemon=True).start()
    urls, deadline = {}, time.monotonic() + timeout_s
    while len(urls) < 2:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"wmtp ui printed {urls} within {timeout_s} s") from None
        if match := URL_LINE.match(line.strip()):
            urls[match[1]] = match[2]
            if match[1] == "MLflow":  # a page that opens on the training runs, not MLflow 3's GenAI pages
                assert match[3] == "/#/experiments?workflowType=machine_learning", line
    return urls


def _post(url: str, body: dict):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _mlflow_run_ids(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=wmtp") as response:
        experiment_id = json.load(response)["experiment"]["experiment_id"]
    found = _post(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
    return {run["info"]["run_id"] for run in found.get("runs", [])}


def _proc_stats() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process, from /proc (a process may exit while it is read)."""
    stats = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie has exited; only its parent's wait is missing
            stats.append((int(stat.parent.name), int(fields[1]), int(fields[2])))
    return stats


def _children(pid: int) -> list[int]:
    return [child for child, parent, _ in _proc_stats() if parent == pid]


def _group_members(group: int) -> list[int]:
    return [pid for pid, _, pgid in _proc_stats() if pgid == group]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
