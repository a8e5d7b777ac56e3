"""Training on a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster, every address 127.0.0.1): two
workers on two nodes, one of them lost midway, end with torchrun's weights (the loss costs nothing past the last
checkpoint), a SIGTERM to the workers saves at one step, and a run resumed at another size sees every sample exactly
once.

Each Ray job is its driver as the training task runs it (a bounded subprocess); a hang fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from support import ROOT
from support.checkpoints import copy_run_up_to, full_model_state
from support.ray_cluster import lose_a_node_after_step_6, plan_ray_job, rank_logs, run_ray_job, start_ray_job, wait_for
from support.recipes import TINY_OVERRIDES
from support.torchrun import torchrun_worker
from support.training import plan_and_train

from benchmarks.servers import RAY_LOOPBACK_ONLY
from wmtp_core.data.sequences import epoch_batches
from wmtp_core.launch.torchrun import worker_command
from wmtp_core.layout import RunLayout
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import plan_run, write_plan
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.runtime.ray_cluster import ClusterError

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
LONG = ["train.max_steps=60", "train.save_every=6", "train.keep_last=20", "train.eval_every=1000"]
"""Long enough that a node can be removed while it trains (a tiny step takes tens of ms)."""


@pytest.fixture
def cluster(ray_cluster):
    return ray_cluster


def recipe_on(cluster, *extra: str):
    return load_recipe(
        None,
        [
            *TINY_OVERRIDES,
            "devices.strategy=ddp",
            "devices.timeout_s=60",
            "tracking.enabled=false",
            "devices.launcher=ray",
            f"ray.address={cluster.address}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def torchrun_weights(tmp_path_factory):
    """The LONG run under torchrun with 2 processes, uninterrupted: its final weights."""
    run_dir = tmp_path_factory.mktemp("torchrun")
    recipe = load_recipe(
        None, [*TINY_OVERRIDES, *LONG, "devices.strategy=ddp", "devices.nproc_per_node=2", "tracking.enabled=false"]
    )
    _, outcome = torchrun_worker(recipe, run_dir, timeout=300)
    return full_model_state(Path(outcome["result"]["latest_checkpoint"]))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def lost_node_job(ray_cluster, tmp_path_factory) -> tuple[dict, Path]:
    """The LONG run as a 2-worker Ray job whose rank-1 node is lost after the step-6 checkpoint (one job serves the
    tests of the uninterrupted placement and of the restart: a Ray job costs about 25 s to start here):
    (its outcome, its run directory)."""
    run_dir = tmp_path_factory.mktemp("lost-node")
    driver = start_ray_job(recipe_on(ray_cluster, *LONG, "ray.workers=2"), run_dir)
    output, _ = lose_a_node_after_step_6(ray_cluster, driver, run_dir, timeout=300)
    assert driver.returncode == 0, output[-3000:]
    return json.loads((run_dir / "ray_result.json").read_text()), run_dir


def test_two_workers_on_two_nodes_end_with_the_torchrun_weights(cluster, lost_node_job, torchrun_weights):
    assert {node.node_ip_address for node in cluster.list_all_nodes()} == {"127.0.0.1"}
    outcome, run_dir = lost_node_job
    assert outcome["ok"], outcome
    assert_same_weights(full_model_state(Path(outcome["result"]["latest_checkpoint"])), torchrun_weights)
    first_attempt = [log for log in rank_logs(run_dir) if log.parent.name == "attempt_1"]
    headers = [log.read_text().splitlines()[0] for log in first_attempt]
    assert len({header.split(" on Ray node ")[1].split()[0] for header in headers}) == 2, headers  # one per node


def test_a_lost_node_restarts_the_workers_and_costs_nothing_past_the_last_checkpoint(lost_node_job, torchrun_weights):
    outcome, run_dir = lost_node_job
    assert outcome["ok"], outcome
    assert outcome["result"]["resumed_from_step"] >= 6  # the restart resumed, not started over
    assert {log.parent.name for log in rank_logs(run_dir)} >= {"attempt_1", "attempt_2"}
    assert_same_weights(full_model_state(Path(outcome["result"]["latest_checkpoint"])), torchrun_weights)


def test_sigterm_to_the_ranks_saves_at_one_step_and_stops_without_a_restart(cluster, tmp_path):
    """What a preempted node's processes get. (A SIGTERM to the driver reaches the ranks through the job directory:
    tests/unit/test_ray_stop.py.)"""
    driver = start_ray_job(recipe_on(cluster, *LONG, "ray.workers=2"), tmp_path)
    try:
        wait_for(lambda: RunLayout(tmp_path).checkpoint(6).is_dir(), timeout=240)
        for pid in training_processes(tmp_path):
            os.kill(pid, signal.SIGTERM)
        output, _ = driver.communicate(timeout=240)
    finally:
        driver.kill()
    assert driver.returncode == 0, output[-3000:]
    outcome = json.loads((tmp_path / "ray_result.json").read_text())
    assert outcome["error_type"] == "TrainingInterrupted", outcome
    saved = sorted(RunLayout(tmp_path).checkpoints.glob("step_*"))[-1]
    assert 6 < int(saved.name.split("_")[1]) < 60  # the stop checkpoint, past the last interval save
    assert {log.parent.name for log in rank_logs(tmp_path)} == {"attempt_1"}  # a stop is not a failure to restart


@pytest.mark.parametrize(
    ("before", "after", "layout"),
    [(2, 1, ["devices.strategy=ddp"]), (1, 2, ["devices.strategy=fsdp", "checkpoint.format=sharded"])],
    ids=["full-2-to-1", "sharded-1-to-2"],
)
def test_a_resume_at_another_size_trains_on_every_sample_once_on_the_same_losses(
    cluster, tmp_path, before, after, layout
):
    """2 Ray workers and 1 process (in this one: a 1-worker Ray job runs the same single rank, slower), each
    micro-batch's sample ids counted from the data ledger."""
    common = ["train.max_steps=6", "train.save_every=3", "train.eval_every=1000", "data.ledger=true", *layout]
    straight, straight_reports = train_on(before, cluster, tmp_path / "straight", common)
    interrupted = tmp_path / "resumed"  # the straight run as if it had stopped after its step-3 checkpoint
    copy_run_up_to(tmp_path / "straight", interrupted, step=3)
    trained_before = [entry for entry in ledger_entries(tmp_path / "straight") if entry["position"] < 3 * 2]
    resumed, reports = train_on(after, cluster, interrupted, common, resume=interrupted / "checkpoints/step_00000003")
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6, resumed

    taken = trained_before + ledger_entries(interrupted)
    positions = sorted((entry["epoch"], entry["position"]) for entry in taken)
    assert positions == sorted(set(positions)), "a micro-batch was trained on twice"
    assert positions == [(0, position) for position in range(6 * 2)], "micro-batches were skipped"
    order = data_order(interrupted, epoch=0)
    assert all(entry["ids"] == order[entry["position"]] for entry in taken)
    assert losses_of(reports) == pytest.approx({s: losses_of(straight_reports)[s] for s in (4, 5, 6)}, rel=1e-5)


def train_on(workers: int, cluster, run_dir: Path, overrides: list[str], *, resume=None) -> tuple[dict, list[dict]]:
    """Train with workers Ray workers, or in this process for 1, at the same global batch (2 micro-batches a step);
    return the TrainResult as a dict and rank 0's metric reports."""
    sized = [*overrides, f"train.grad_accumulation_steps={2 // workers}"]
    if workers > 1:
        outcome, reports = run_ray_job(recipe_on(cluster, *sized, f"ray.workers={workers}"), run_dir, resume=resume)
        assert outcome["ok"], outcome
        return outcome["result"], reports
    reports = []
    result = plan_and_train(
        load_recipe(None, [*TINY_OVERRIDES, *sized, "tracking.enabled=false"]),
        run_dir,
        resume_from=resume,
        on_metrics=lambda step, metrics: reports.append({"step": step, "metrics": metrics}),
    )
    return asdict(result), reports


def ledger_entries(run_dir: Path) -> list[dict]:
    """Every micro-batch the run's ranks trained on (data.ledger), from every rank's ledger."""
    ledgers = (run_dir / "data_ledger").glob("rank*.jsonl")
    return [json.loads(line) for ledger in ledgers for line in ledger.read_text().splitlines()]


def losses_of(reports: list[dict]) -> dict[int, float]:
    return {report["step"]: report["metrics"]["loss"] for report in reports if "loss" in report["metrics"]}


def data_order(run_dir: Path, *, epoch: int) -> list[list[int]]:
    """The sample ids of every micro-batch of the run's epoch, as the data order defines them."""
    from wmtp_core.data.records import load_records, split_records
    from wmtp_core.run.plan import read_plan

    recipe = read_plan(run_dir).recipe
    records = load_records(read_plan(run_dir).data_file)
    train, _ = split_records(records, eval_fraction=recipe.data.eval_fraction, seed=recipe.seed)
    return epoch_batches(len(train), batch_size=recipe.data.batch_size, seed=recipe.seed, epoch=epoch)


def training_processes(run_dir: Path) -> list[int]:
    """The pids of the run's training processes (each Ray worker's child running wmtp_core.training.worker)."""
    plan = str(RunLayout(run_dir).plan)
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"wmtp_core.training.worker" in argv and plan.encode() in argv:
            pids.append(int(cmdline.parent.name))
    assert pids, "no training process found"
    return pids


def test_more_workers_than_the_cluster_holds_are_refused_in_seconds_with_nothing_written(cluster, tmp_path):
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"ray.workers=3 .* 127.0.0.1: 1 CPU.*room for 2"):
        plan_ray_job(recipe_on(cluster, "ray.workers=3"), tmp_path / "run")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "run").exists()


def test_a_job_whose_cluster_shrank_after_planning_fails_in_seconds_saying_so(cluster, tmp_path):
    """The driver checks again: a plan made for a bigger cluster (here, planned with this machine's probe), or a
    retry after a node was lost for good, ends at once instead of waiting for resources that never come."""
    planned = plan_run(recipe_on(cluster, "ray.workers=3"), directory=tmp_path, probe=probe_environment())
    command = worker_command(planned.plan, write_plan(planned), result_file=planned.plan.layout.ray_result)
    started = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    outcome = json.loads((tmp_path / "ray_result.json").read_text())
    assert out.returncode == 1 and outcome["error_type"] == "ClusterError", out.stdout[-2000:]
    assert "ray.workers=3" in outcome["message"] and "room for 2" in outcome["message"]
    assert time.monotonic() - started < 60
    assert not RunLayout(tmp_path).checkpoints.exists()


def test_a_node_that_does_not_see_the_run_directory_is_named(cluster, tmp_path):
    import ray

    from wmtp_core.runtime.ray_cluster import check_every_node_sees, write_visibility_marker

    write_visibility_marker(tmp_path / "job")
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        with pytest.raises(ClusterError, match="not visible from Ray node") as refused:
            check_every_node_sees(tmp_path, tmp_path / "job", token="another file system's token")
        assert str(tmp_path) in str(refused.value) and "127.0.0.1" in str(refused.value)
        check_every_node_sees(tmp_path, tmp_path / "job", token=(tmp_path / "job" / "driver.token").read_text())
    finally:
        ray.shutdown()


WORKER_WHEREABOUTS = """
import json, os, sys
from wmtp_core.config import RayConfig
from wmtp_core.runtime.ray_cluster import connected_to_cluster

with connected_to_cluster(RayConfig(workers=1), sys.argv[1]):
    import ray

    where = ray.get(ray.remote(num_cpus=1)(lambda: {"cwd": os.getcwd(), "python": sys.executable}).remote())
print(json.dumps(where))
"""


def test_a_driver_started_under_uv_run_gives_its_workers_the_installed_environment_not_a_copy(cluster):
    """`uv run wmtp train` starts the driver under `uv run`; Ray's uv hook would then copy the current directory,
    virtual environment and all, to every node and start each worker through `uv run` in that copy."""
    uv = shutil.which("uv")
    assert uv, "uv is on PATH wherever `uv run pytest` runs"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}
    out = subprocess.run(
        [uv, "run", "--no-sync", "python", "-c", WORKER_WHEREABOUTS, cluster.address],
        env=env | RAY_LOOPBACK_ONLY,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    where = json.loads(out.stdout.strip().splitlines()[-1])
    assert "runtime_resources" not in where["cwd"], where
    assert Path(where["python"]).resolve() == Path(sys.executable).resolve(), where
