"""Bad input for a Ray run fails in seconds, names what to change and writes nothing: an unreachable address, a cluster
too small for the workers asked, recipe keys that contradict the launcher."""

from __future__ import annotations

import socket
import time

import pytest
from typer.testing import CliRunner

from benchmarks.servers import free_port
from deployments.cli import app
from wmtp_core.config import RayConfig
from wmtp_core.recipes import load_recipe
from wmtp_core.runtime.ray_cluster import ClusterError, check_capacity, check_reachable, cluster_address


def node(address: str, cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """One entry of ray.nodes(), as Ray gives it."""
    return {"NodeManagerAddress": address, "Alive": alive, "Resources": {"CPU": cpus, "GPU": gpus}}


def test_an_address_nothing_listens_on_fails_in_seconds_naming_it():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ClusterError, match=f"cannot reach the Ray cluster at {address}"):
        check_reachable(address)
    assert time.monotonic() - started < 6


def test_a_listening_address_passes_and_a_malformed_one_is_named():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
    with pytest.raises(ClusterError, match="'head-node' .* is not host:port"):
        check_reachable("head-node")


def test_the_address_comes_from_the_recipe_then_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(RayConfig(address="10.0.0.2:6379")) == "10.0.0.2:6379"
    assert cluster_address(RayConfig()) == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(RayConfig()) is None


def test_workers_are_counted_node_by_node_and_a_shortfall_says_what_the_cluster_has():
    nodes = [node("10.0.0.1", cpus=3), node("10.0.0.2", cpus=1.5), node("10.0.0.3", cpus=8, alive=False)]
    check_capacity(RayConfig(workers=4, cpus_per_worker=1), nodes)  # the dead node's 8 CPUs do not count
    check_capacity(RayConfig(workers=3, cpus_per_worker=1.5), nodes)  # 2 on the first node, 1 on the second
    with pytest.raises(ClusterError, match="room for 2"):  # 4.5 CPUs in all, but no worker spans two nodes
        check_capacity(RayConfig(workers=3, cpus_per_worker=1.5), [node("10.0.0.1", cpus=2.25), node("b", cpus=2.25)])
    with pytest.raises(ClusterError) as refused:
        check_capacity(RayConfig(workers=2, gpus_per_worker=1), [node("10.0.0.1", cpus=8, gpus=1)])
    message = str(refused.value)
    assert "ray.workers=2" in message and "room for 1" in message and "10.0.0.1: 8 CPU, 1 GPU" in message


def test_ray_keys_that_contradict_the_launcher_are_refused_naming_them():
    with pytest.raises(ValueError, match="set ray.workers instead of devices.nproc_per_node=2"):
        load_recipe(None, ["devices.launcher=ray", "devices.nproc_per_node=2", "devices.strategy=ddp"])
    with pytest.raises(ValueError, match="ray.workers=2 starts 2 processes but devices.strategy=single"):
        load_recipe(None, ["devices.launcher=ray", "ray.workers=2"])


def test_train_on_an_unreachable_cluster_exits_2_naming_it_and_writes_nothing(wmtp_home):
    address = f"127.0.0.1:{free_port()}"
    settings = ["devices.launcher=ray", "devices.strategy=ddp", f"ray.address={address}", "run.name=nowhere"]
    started = time.monotonic()
    result = CliRunner().invoke(app, ["train", *[arg for key in settings for arg in ("--set", key)]])
    assert result.exit_code == 2, result.output
    assert address in result.output and "ray.address or RAY_ADDRESS" in result.output
    assert time.monotonic() - started < 30
    assert not (wmtp_home / "runs" / "nowhere").exists()
