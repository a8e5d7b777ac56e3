"""`wmtp ui`: the Prefect UI on the CLI's run history and the MLflow UI on the embedded store, both on 127.0.0.1,
until Ctrl-C. A Prefect server or MLflow tracking server the user configured is named instead of started.

The Prefect UI is a `prefect server start` on the database the CLI's temporary server writes
($WMTP_HOME/prefect/prefect.db unless PREFECT_SERVER_DATABASE_CONNECTION_URL says otherwise), so every CLI run so
far is there, and a run made while it is open appears as it goes. The servers' output goes to $WMTP_HOME/ui/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import typer

from deployments import server_processes as processes
from deployments.cli_options import FAILURE, invalid_input_guard
from flows.temporary_server import configured_api_url, default_prefect_environment
from wmtp_core.layout import wmtp_home
from wmtp_core.runtime.redaction import without_credentials

DEFAULT_PREFECT_PORT, DEFAULT_MLFLOW_PORT = 4200, 5000  # the ports both projects' docs use
START_TIMEOUT_S = 300  # a first Prefect start creates its database: over a minute on a busy two-core machine

PrefectPortOption = typer.Option(
    None, "--prefect-port", help=f"Port of the Prefect UI (default {DEFAULT_PREFECT_PORT}, or a free one if taken)."
)
MlflowPortOption = typer.Option(
    None, "--mlflow-port", help=f"Port of the MLflow UI (default {DEFAULT_MLFLOW_PORT}, or a free one if taken)."
)


@dataclass
class UiServer:
    """A UI server this command started: what it shows, where, and its process group."""

    name: str
    url: str
    health_url: str
    page: str
    """What a person opens: url, or a page of it."""
    process: subprocess.Popen
    log: Path


class _Stopped(Exception):
    """Ctrl-C (SIGINT) or SIGTERM: the way this command ends."""


def ui(prefect_port: int | None = PrefectPortOption, mlflow_port: int | None = MlflowPortOption) -> None:
    """Open the Prefect UI on every run the CLI made and the MLflow UI on the embedded store (127.0.0.1) until
    Ctrl-C; a Prefect server or MLflow URI you configured is named instead."""
    default_prefect_environment()  # the database the CLI's temporary server uses, as `wmtp train` sets it
    from tracking.client import tracking_uri

    planned = []
    prefect_api = configured_api_url()
    if prefect_api:
        print(f"Prefect UI: {_configured_prefect_ui(prefect_api)}  (your server, from Prefect's settings)")
    else:
        port = invalid_input_guard(lambda: choose_port(prefect_port, DEFAULT_PREFECT_PORT, "--prefect-port"))
        planned.append(partial(_start_prefect, port))
    if _is_tracking_server(tracking_uri()):
        # an address for a browser, which asks for the login itself: no credentials printed
        print(f"MLflow UI: {without_credentials(tracking_uri())}  (your tracking server, from MLFLOW_TRACKING_URI)")
    else:
        port = invalid_input_guard(lambda: choose_port(mlflow_port, DEFAULT_MLFLOW_PORT, "--mlflow-port"))
        planned.append(partial(_start_mlflow, port, tracking_uri()))
    if planned:
        serve_until_stopped(planned)


def choose_port(requested: int | None, default: int, option: str) -> int:
    """The port asked for (refused when taken), else the default, else a free one."""
    if requested is not None:
        if not processes.port_is_free(requested):
            raise ValueError(f"port {requested} is in use: choose another with {option}, or leave it out")
        return requested
    if processes.port_is_free(default):
        return default
    port = processes.free_port()
    print(f"port {default} is in use; using {port} (choose one with {option})", file=sys.stderr)
    return port


def _configured_prefect_ui(api_url: str) -> str:
    from prefect.settings import PREFECT_UI_URL

    return PREFECT_UI_URL.value() or api_url


def _is_tracking_server(uri: str) -> bool:
    # A database URI (the embedded sqlite store, or one the user set) has no UI of its own: we serve one on it.
    return uri.startswith(("http://", "https://", "databricks"))


def _start_prefect(port: int) -> UiServer:
    url = f"http://127.0.0.1:{port}"
    # The UI calls the API at 4200 unless told where its own server listens.
    env = {**os.environ, "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [_script("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return _start("Prefect", command, env=env, url=url, health_url=f"{url}/api/health", page=f"{url}/runs")


def _start_mlflow(port: int, store: str) -> UiServer:
    url = f"http://127.0.0.1:{port}"
    command = [_script("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # Artifacts under $WMTP_HOME, where the embedded store keeps them (MLflow's default is ./mlartifacts).
    command += ["--backend-store-uri", store, "--artifacts-destination", str(wmtp_home() / "mlartifacts")]
    # MLflow 3's job runner (GenAI jobs) would take both cores for a minute after the start; the UI needs none of it.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    from tracking.client import TRAINING_VIEW

    page = f"{url}/#/experiments?{TRAINING_VIEW}"  # the training runs, not MLflow 3's GenAI pages
    return _start("MLflow", command, env=env, url=url, health_url=f"{url}/health", page=page)


def _script(name: str) -> str:
    """A console script of this environment (the one `uv run` put first on PATH, found without PATH)."""
    return str(Path(sys.executable).parent / name)


def _start(name: str, command: list[str], *, env: dict[str, str], url: str, health_url: str, page: str) -> UiServer:
    log = wmtp_home() / "ui" / f"{name.lower()}.log"
    process = processes.start_in_own_session(command, log=log, env=env)
    return UiServer(name=name, url=url, health_url=health_url, page=page, process=process, log=log)


def serve_until_stopped(planned: list[Callable[[], UiServer]]) -> None:
    """Start the planned servers, print their URLs, and keep them until Ctrl-C or SIGTERM (exit 0) or until one
    exits (exit 1); either way every process they started is stopped."""
    # SIGINT too: a command started in the background by a script inherits SIGINT ignored, so Python's own
    # Ctrl-C handling would never fire.
    signal.signal(signal.SIGINT, _raise_stopped)
    signal.signal(signal.SIGTERM, _raise_stopped)
    servers: list[UiServer] = []
    try:
        for start in planned:
            servers.append(start())
        print(f"starting {_names(servers)} (up to a minute; logs in {servers[0].log.parent})", file=sys.stderr)
        for server in servers:
            _wait_until_up(server)
            print(f"{server.name} UI: {server.page}", flush=True)
        print("Ctrl-C stops them.", file=sys.stderr)
        _watch(servers)
    except (KeyboardInterrupt, _Stopped):
        _stop(servers)
        print(f"stopped {_names(servers)}", file=sys.stderr)
    except RuntimeError as error:
        _stop(servers)
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(FAILURE) from None


def _wait_until_up(server: UiServer) -> None:
    try:
        processes.wait_for_http(server.health_url, server.process, timeout_s=START_TIMEOUT_S, log=server.log)
    except RuntimeError as error:
        raise RuntimeError(f"the {server.name} UI did not start: {error}") from None


def _names(servers: list[UiServer]) -> str:
    return " and ".join(f"the {server.name} UI" for server in servers) or "nothing"


def _watch(servers: list[UiServer]) -> None:
    """Keep the servers until Ctrl-C or SIGTERM (raised by their handlers); raise when a server exits on its own."""
    while True:
        for server in servers:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"the {server.name} UI server exited with {server.process.returncode}; see {server.log}"
                )
        time.sleep(0.5)


def _stop(servers: list[UiServer]) -> None:
    # A second Ctrl-C must not cut the stopping short and leave servers behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for server in servers:
        processes.stop_process_group(server.process, signal.SIGTERM, grace_s=15)


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped()
