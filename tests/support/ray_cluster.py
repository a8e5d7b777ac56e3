"""A real two-node Ray cluster on this machine, every address on loopback, and Ray jobs run on it as the training task
runs them (the driver, wmtp_core.launch.ray_job, as a bounded subprocess)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from wmtp_core.launch.torchrun import worker_command
from wmtp_core.run.plan import plan_run, write_plan
from wmtp_core.training.worker import METRICS_PREFIX


def plan_ray_job(recipe, run_dir: Path, *, resume: str | Path | None = None) -> list[str]:
    """Plan recipe's run in run_dir and return the driver's command line (the one the training task runs)."""
    planned = plan_run(recipe, resume=resume, directory=run_dir)
    return worker_command(planned.plan, write_plan(planned), result_file=planned.plan.layout.ray_result)


def start_ray_job(recipe, run_dir: Path) -> subprocess.Popen:
    """Plan recipe's run in run_dir and start its driver, its output piped (text)."""
    command = plan_ray_job(recipe, run_dir)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_ray_job(recipe, run_dir: Path, *, resume=None, timeout: int = 300) -> tuple[dict, list[dict]]:
    """Run recipe's Ray job to its end; return its outcome and rank 0's metric reports, asserting the driver ended."""
    out = subprocess.run(plan_ray_job(recipe, run_dir, resume=resume), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads((run_dir / "ray_result.json").read_text()), metric_reports(out.stdout)


def metric_reports(stdout: str) -> list[dict]:
    return [json.loads(line[len(METRICS_PREFIX) :]) for line in stdout.splitlines() if line.startswith(METRICS_PREFIX)]


def rank_logs(run_dir: Path) -> list[Path]:
    """Every rank's log of every job and attempt, oldest job first."""
    return sorted((run_dir / "logs" / "ray").glob("*/attempt_*/rank_*.log"))


def lose_the_node_of(cluster, run_dir: Path, *, rank: int) -> None:
    """Remove the node that runs rank's worker (its raylet and every process on it die at once, as when a machine is
    lost), then add a replacement of one CPU for the restarted worker group. The rank's newest log names the node."""
    log = [log for log in rank_logs(run_dir) if log.name == f"rank_{rank}.log"][-1]
    node_id = log.read_text().split(" on Ray node ")[1].split()[0]
    cluster.remove_node(next(node for node in cluster.list_all_nodes() if node.node_id == node_id))
    cluster.add_node(num_cpus=1)


def lose_a_node_after_step_6(cluster, process: subprocess.Popen, run_dir: Path, *, timeout: float) -> tuple:
    """Once run_dir has its step-6 checkpoint, lose the node of rank 1, then wait for process (training the run
    there) to end: its (stdout, stderr). It is killed if any of this fails or takes longer than timeout."""
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step_00000006").is_dir(), timeout=timeout)
        lose_the_node_of(cluster, run_dir, rank=1)
        return process.communicate(timeout=timeout)
    finally:
        process.kill()


def wait_for(condition, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
