"""The Ray cluster a run trains on: which one, whether it can be reached, whether it can hold the workers asked for,
and whether every node sees the run directory. Each check fails in seconds with a message that says what to change,
before anything trains (Ray itself would retry a dead address for a minute and wait for missing resources for ever).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from wmtp_core.config import RayConfig
from wmtp_core.runtime.device_plan import EnvironmentProbe

REACH_TIMEOUT_S = 5.0

RAY_USES_THIS_ENVIRONMENT = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
"""Set before Ray is imported. Every node runs the environment installed on it (docs/ray.md); without this, a driver
started under `uv run` (as `uv run wmtp train` starts it) has Ray copy the current directory, virtual environment and
all, into each node's session directory and start every worker through `uv run` there: gigabytes per node, and a
first job whose ranks time out at the rendezvous while a node is still copying."""


class ClusterError(ValueError):
    """The Ray cluster cannot run this job as asked; the message names the address, resource or directory."""


def cluster_address(settings: RayConfig) -> str | None:
    """ray.address, else $RAY_ADDRESS, else None (a Ray instance started on this machine for the run)."""
    return settings.address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str) -> None:
    """A GCS address (host:port) must accept a connection within REACH_TIMEOUT_S."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return  # Ray resolves these itself ("auto": the cluster this machine joined) and fails fast on its own
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} (ray.address or RAY_ADDRESS) is not host:port")
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} (ray.address or RAY_ADDRESS) within {REACH_TIMEOUT_S:.0f} s: "
            f"{error}; start it with `ray start --head` or fix the address"
        ) from None


def check_capacity(settings: RayConfig, nodes: list[dict]) -> None:
    """The live nodes (ray.nodes()) can place ray.workers workers of ray.cpus_per_worker CPUs and
    ray.gpus_per_worker GPUs each, counted node by node (a worker never spans nodes)."""
    fits = sum(_workers_fitting(node["Resources"], settings) for node in nodes if node["Alive"])
    if fits >= settings.workers:
        return
    have = ", ".join(_resources_text(node) for node in nodes if node["Alive"]) or "no live nodes"
    raise ClusterError(
        f"ray.workers={settings.workers} workers of {settings.cpus_per_worker:g} CPU and "
        f"{settings.gpus_per_worker:g} GPU each do not fit on the cluster ({have}): room for {fits}; lower "
        "ray.workers, ray.cpus_per_worker or ray.gpus_per_worker, or add nodes"
    )


def _workers_fitting(resources: dict, settings: RayConfig) -> int:
    by_cpu = int(resources.get("CPU", 0) // settings.cpus_per_worker)
    if settings.gpus_per_worker == 0:
        return by_cpu
    return min(by_cpu, int(resources.get("GPU", 0) // settings.gpus_per_worker))


def _resources_text(node: dict) -> str:
    resources = node["Resources"]
    return f"{node['NodeManagerAddress']}: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"


PROBE_TIMEOUT_S = 120.0


def survey_cluster(settings: RayConfig, address: str | None) -> EnvironmentProbe:
    """What the run's workers will train on, checked before anything is written: with an address, the cluster must
    answer (check_reachable) and hold the workers (check_capacity); without one (a Ray instance started here for
    the run), this machine must. The probe is of a worker's machine: with ray.gpus_per_worker, a task with one
    worker's resources probes a node that has them (the planning machine, a Kubernetes head or a login node, often
    has no GPU); without, Ray hides every GPU from the workers, so the workers train on CPU."""
    from wmtp_core.runtime.devices import probe_environment

    if address is None:
        here = probe_environment()
        gpus = here.cuda_device_count
        check_capacity(settings, [_node("this machine", cpus=here.cpu_count, gpus=gpus)])
        return here if settings.gpus_per_worker else _without_gpus(here)
    with connected_to_cluster(settings, address):
        import ray

        if not settings.gpus_per_worker:
            return _without_gpus(probe_environment())
        probe = ray.remote(num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker)(probe_environment)
        try:
            return ray.get(probe.remote(), timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(
                f"no Ray node at {address} could start a worker of {settings.cpus_per_worker:g} CPU and "
                f"{settings.gpus_per_worker:g} GPU within {PROBE_TIMEOUT_S:.0f} s (busy with other jobs?)"
            ) from None


@contextlib.contextmanager
def connected_to_cluster(settings: RayConfig, address: str | None) -> Iterator[list[dict]]:
    """This process connected to the cluster at address (None: a Ray instance started here for the run), after
    checking that it answers; yields its nodes (ray.nodes()) once they are found able to hold the workers
    (ClusterError otherwise), and disconnects on leaving. The planner and the job's driver both connect here."""
    if address is not None:
        check_reachable(address)  # before Ray loads: a wrong address costs seconds, not Ray's minute of retries
    for name, value in RAY_USES_THIS_ENVIRONMENT.items():
        os.environ.setdefault(name, value)  # a user who sets it has chosen
    import ray

    local = {} if address is not None else {"include_dashboard": False}  # Ray refuses it for an existing cluster
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **local)
    try:
        nodes = ray.nodes()
        check_capacity(settings, nodes)
        yield nodes
    finally:
        ray.shutdown()


def _node(address: str, *, cpus: float, gpus: float) -> dict:
    return {"NodeManagerAddress": address, "Alive": True, "Resources": {"CPU": cpus, "GPU": gpus}}


def _without_gpus(probe: EnvironmentProbe) -> EnvironmentProbe:
    hidden = {"cuda_available": False, "cuda_device_count": 0, "cuda_device_name": None, "cuda_bf16_supported": False}
    return probe.model_copy(update=hidden)


def write_visibility_marker(job_dir: Path) -> str:
    """A file with a fresh token in the job's directory: a node that reads the same token sees the same directory."""
    token = uuid.uuid4().hex
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "driver.token").write_text(token)
    return token


def sees_run_directory(job_dir: str, token: str) -> bool:
    """On a node: does job_dir hold the driver's token? (Another file system mounted at the same path does not.)"""
    marker = Path(job_dir) / "driver.token"
    try:
        return marker.read_text() == token
    except OSError:
        return False


def check_every_node_sees(run_dir: Path, job_dir: Path, token: str) -> None:
    """Ask every live node (one zero-CPU task pinned to each) whether it sees the run directory (the token in
    job_dir, inside it); name those that do not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(sees_run_directory)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    answers = ray.get(
        [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
                str(job_dir), token
            )
            for node in nodes
        ]
    )
    blind = [f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})" for node, seen in zip(nodes, answers) if not seen]
    if blind:
        raise ClusterError(
            f"the run directory {run_dir} is not visible from Ray node(s) {', '.join(blind)}: "
            "every node must see it at the same path (a shared file system: NFS, a Kubernetes ReadWriteMany volume, "
            "a Slurm cluster's shared home); set WMTP_HOME to such a path"
        )
