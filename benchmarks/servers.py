"""Real servers (`mlflow server`, `prefect server start`) on a free loopback port, stopped by their owner, and a real
Ray cluster on this machine; used by benchmarks (tracking_overhead.py, ray_launcher.py) and the tests that talk to a
real server or cluster."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from deployments.server_processes import free_port, start_in_own_session, stop_process_group, wait_for_http

__all__ = ["free_port", "stop_process_group", "wait_for_http"]  # shared with the tests that import them from here


class LoopbackServer:
    """A server process on a free loopback port with its files (and server.log) under root."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, free_port(), None
        root.mkdir(parents=True, exist_ok=True)

    def launch(
        self, command: list[str], *, health_url: str, timeout_s: float, env: dict[str, str] | None = None
    ) -> None:
        """Start command and wait until health_url answers; a server that never does is stopped before raising."""
        log = self.root / "server.log"
        self.process = start_in_own_session(command, log=log, env=env)
        try:
            wait_for_http(health_url, self.process, timeout_s=timeout_s, log=log)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process_group(self.process, signal.SIGTERM, grace_s=15)


class MlflowServer(LoopbackServer):
    """A real `mlflow server` (SQLite backend, local artifact store) on a loopback port, to stop and restart."""

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180) -> None:
        mlflow = str(Path(sys.executable).parent / "mlflow")
        command = [
            mlflow,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        # MLflow 3's server also starts a job runner (about ten huey consumer processes, for GenAI jobs) that
        # takes two cores for a minute after every start; tracking needs none of it.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.launch(command, health_url=f"{self.uri}/health", timeout_s=timeout_s, env=env)


class PrefectServer(LoopbackServer):
    """A real `prefect server start` (SQLite in its own PREFECT_HOME, no UI, no scheduler service) on a loopback port.

    The scheduler service is off so no cron schedule fires during a test; schedules are still stored and readable.
    """

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout_s: float = 180) -> None:
        prefect = str(Path(sys.executable).parent / "prefect")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.root),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        )
        command = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.launch(command, health_url=f"{self.api_url}/health", timeout_s=timeout_s, env=env)


RAY_LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Makes Ray advertise 127.0.0.1 for every node (without it, Ray advertises the machine's interface address)."""


def start_ray_cluster(worker_nodes: int = 2):
    """A Ray cluster on this machine (ray.cluster_utils.Cluster), every address 127.0.0.1: a head with no CPUs (it
    holds Ray's own actors, never a training worker) and worker_nodes nodes of one CPU each, so two training workers
    land on two nodes. The caller shuts it down."""
    from wmtp_core.runtime.ray_cluster import RAY_USES_THIS_ENVIRONMENT

    os.environ.update(RAY_LOOPBACK_ONLY | RAY_USES_THIS_ENVIRONMENT)  # before Ray loads in this process
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(worker_nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster
