"""Prefect for local runs: the CLI's environment defaults, and the temporary server started ahead of the flow run.

A flow run without PREFECT_API_URL starts Prefect's temporary server itself and waits for it: tens of seconds on two
cores the first time (it creates its database), less after that. Started first, in a background thread, it comes
up while the parent process loads what the run needs anyway (the flow's tasks, MLflow, torch), instead of after.
The flow run then finds the same server already answering: Prefect keeps one temporary server per process.

The server runs in a session of its own, so a signal to the CLI's process group (Ctrl-C, `timeout`, systemd, Slurm)
does not take it down while the flow still saves and reports; the CLI stops it at exit (the exit handler Prefect
registers, here stopping its whole process group), and the server ends itself if the CLI dies without stopping it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from wmtp_core.layout import wmtp_home

PARENT_PID = "WMTP_TEMPORARY_SERVER_PARENT"
"""The CLI's pid, in the server's environment: the server ends itself once its parent is gone."""


def start_temporary_server() -> Callable[[], None]:
    """Start the temporary server a flow run in this process would start, if it would start one (no
    PREFECT_API_URL, Prefect's ephemeral mode on); return `wait`, which blocks until the server answers and
    raises the error that kept it from starting. Prefect stops the server when the process exits."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED

    if configured_api_url() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    import prefect.main  # noqa: F401  (sets up Prefect's logging, so the server's start line shows)
    from prefect.server.api.server import subprocess_server_logger

    subprocess_server_logger.addFilter(_our_words_for_the_server)

    server = _session_server_class()()  # the instance the flow run's client asks for: it will not start a second
    failures: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as error:  # raised in the caller's thread by wait()
            failures.append(error)

    # A daemon thread: a CLI that exits early (bad input found late, Ctrl-C) does not wait for the server to come
    # up; the exit handler Prefect registers as it launches the server stops it.
    thread = threading.Thread(target=start, name="wmtp-prefect-server-start", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failures:
            raise failures[0]

    return wait


def _session_server_class() -> type:
    """Prefect's SubprocessASGIServer, started in a session of its own and stopped with its whole process group.
    The instance is the one Prefect's clients find (SubprocessASGIServer keeps one per port, subclasses included)."""
    from prefect.server.api.server import SubprocessASGIServer

    class SessionServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            return _start_in_own_session(self.port)

        def stop(self) -> None:
            if self.server_process is not None:
                _stop_group(self.server_process)
            super().stop()  # forgets the reaped process and the instance

    return SessionServer


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group; SIGKILL to what is left of it after 5 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # the group has ended: the server and anything it started
        process.wait()
        return
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):  # usually nothing of the group is left
        os.killpg(process.pid, signal.SIGKILL)


def _start_in_own_session(port: int) -> subprocess.Popen:
    """What SubprocessASGIServer runs (uvicorn on Prefect's app, no UI), in a new session, through an app factory
    that watches the parent."""
    import prefect
    from prefect.settings import get_current_settings

    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory"]
    command += ["flows.temporary_server:app_ending_with_parent", "--host", "127.0.0.1", "--port", str(port)]
    settings = get_current_settings().to_environment_variables(exclude_unset=True)
    server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env = {**os.environ, **server_env, **settings, PARENT_PID: str(os.getpid())}
    return subprocess.Popen([*command, "--log-level", "error", "--lifespan", "on"], env=env, start_new_session=True)


def app_ending_with_parent():
    """uvicorn's app factory in the temporary server: Prefect's app, and a thread that stops the server (SIGTERM,
    uvicorn's graceful shutdown) once the CLI that started it is gone (killed with SIGKILL: no exit handler ran)."""
    from prefect.server.api.server import create_app

    parent = int(os.environ[PARENT_PID])
    threading.Thread(target=_end_with_parent, args=(parent,), name="wmtp-parent-watch", daemon=True).start()
    return create_app()


def _end_with_parent(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is adopted by init (or a subreaper): its parent pid changes
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # uvicorn finishes a start-up (the database's migrations) before it shuts down: not forever
    os._exit(1)


def _our_words_for_the_server(record: logging.LogRecord) -> bool:
    """Prefect announces its temporary server with a link to its self-hosting guide, and its stop too; say instead
    what the user can do with it (the server's own logger: nothing else Prefect logs passes through here)."""
    message = record.getMessage()
    if message.startswith("Stopping temporary server"):
        return False
    if message.startswith("Starting temporary server on "):
        address = message.removeprefix("Starting temporary server on ").split()[0]
        record.msg, record.args = f"temporary Prefect server on {address} for this run (`wmtp ui` shows every run)", ()
    return True


def default_prefect_environment() -> None:
    """Local-run defaults, each only when the user has not set it in the environment: the temporary server's
    database under $WMTP_HOME, a start-up timeout that survives a slow first start, and core logs in the run log.

    PREFECT_HOME is left alone: it is also where Prefect reads profiles, so moving it would hide the user's
    `prefect config set PREFECT_API_URL=...` or `prefect cloud login`. The database URL only matters to a server
    this process starts (none when an API URL is set in the environment, a profile or prefect.toml).
    """
    if (
        "PREFECT_SERVER_DATABASE_CONNECTION_URL" not in os.environ
        and "PREFECT_API_DATABASE_CONNECTION_URL" not in os.environ
    ):
        prefect_dir = wmtp_home() / "prefect"
        prefect_dir.mkdir(parents=True, exist_ok=True)
        database = f"sqlite+aiosqlite:///{prefect_dir / 'prefect.db'}"
        os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "wmtp_core,tasks")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def configured_api_url() -> str | None:
    """The Prefect API URL as Prefect resolves it: environment, then the active profile, then prefect.toml (or
    pyproject.toml's [tool.prefect]); None when none sets one (a flow run then starts a temporary server)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def watch_live_hint(flow_run_id: str | None) -> str:
    """Where to see this flow run in the Prefect UI: the configured server's page for it, or `wmtp ui`, which opens
    one on the temporary server's database (a run made while it is open shows there as it goes)."""
    from prefect.settings import PREFECT_UI_URL

    if configured_api_url() is None:
        return "Prefect UI: `uv run wmtp ui` (every run so far, and MLflow's UI)"
    return f"Prefect UI: {PREFECT_UI_URL.value()}/flow-runs/flow-run/{flow_run_id}"
