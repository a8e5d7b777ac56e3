"""What each Ray Train worker runs: one rank of the run, as the same `wmtp_core.training.worker` process a torchrun
rank is.

Ray Train's TorchTrainer places the workers and joins them in a process group of its own; each worker then starts
the training worker as a child process with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a
fresh MASTER_PORT) and waits for it. A child process, not the training loop in Ray's worker thread, because the loop
must own its main thread: SIGTERM (preemption) and Ctrl-C make every rank save at one step, exactly as under torchrun,
and the exit handlers that release DataLoader semaphores run as they do there.

On every start of the worker group (the first, and each restart after a lost worker or node) rank 0 re-chooses the
run's start (wmtp_core.run.plan.restarted: the newest valid checkpoint, the rule a Prefect retry uses) before any rank
reads the plan, and opens a new attempt directory for the ranks' logs: <job>/attempt_<k>/rank_<r>.log.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from wmtp_core.run.plan import read_plan, restarted, save_plan
from wmtp_core.runtime.ray_cluster import ClusterError, sees_run_directory
from wmtp_core.training.worker import EXIT_TERMINATED, INPUT_ERROR_TYPES, rank_result_file, worker_arguments

STOP_FILE = "stop_requested"
"""Written into the job directory by the driver on SIGTERM or Ctrl-C; holds the signal each rank passes on."""
POLL_S = 0.5


class RankFailed(RuntimeError):
    """A rank's training process failed in a way a restart may fix (Ray Train restarts the worker group)."""


def run_rank(config: dict) -> None:
    """Ray Train's train_loop_per_worker: run this worker's rank to its end. Returns normally when the rank finished,
    was stopped by a signal after saving, or failed on bad input (a restart cannot help; the result file says so);
    raises RankFailed otherwise, so Ray restarts the worker group."""
    import ray
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    job_dir, plan_file = Path(config["job_dir"]), Path(config["plan_file"])
    if not sees_run_directory(str(job_dir), config["token"]):
        raise ClusterError(f"rank {rank} on {socket.gethostname()} does not see the run directory {job_dir}")
    attempt, port = _agree_on_attempt(rank, world, job_dir, plan_file)
    log_file = job_dir / f"attempt_{attempt}" / f"rank_{rank}.log"
    env = os.environ | {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(context.get_local_rank()),
        "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
        "MASTER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    result_file = Path(config["result_file"])
    rank_result_file(result_file, rank).unlink(missing_ok=True)  # an earlier attempt's outcome is not this one's
    command = [sys.executable, *worker_arguments(plan_file, result_file=result_file, manifest_extra=config["extra"])]
    node = ray.get_runtime_context().get_node_id()
    status = run_until_exit(
        command,
        env,
        log_file,
        stop_file=job_dir / STOP_FILE,
        header=f"rank {rank} of {world} on Ray node {node} ({socket.gethostname()}), attempt {attempt}",
    )
    _judge(status, rank, rank_result_file(result_file, rank), log_file)


def _agree_on_attempt(rank: int, world: int, job_dir: Path, plan_file: Path) -> tuple[int, int]:
    """Rank 0 re-chooses the start, opens the next attempt directory and picks a free port for the training
    processes' rendezvous (Ray's own process group holds MASTER_PORT); every rank gets (attempt, port)."""
    decided = [None]
    if rank == 0:
        plan = read_plan(plan_file)
        newer = restarted(plan)
        if newer is not plan:
            save_plan(newer)
        attempt = 1 + len(list(job_dir.glob("attempt_*")))
        (job_dir / f"attempt_{attempt}").mkdir(parents=True)
        decided = [(attempt, _free_port())]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(decided, src=0)
    return decided[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((os.environ.get("MASTER_ADDR", "127.0.0.1"), 0))
        return probe.getsockname()[1]


def run_until_exit(command: list[str], env: dict, log_file: Path, *, stop_file: Path, header: str) -> int:
    """Run the training process with its output in log_file (after a header line saying where it runs); pass the
    driver's stop request on as a signal."""
    with log_file.open("w") as log:
        log.write(f"# {header}\n")
        log.flush()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        forwarded = False
        while process.poll() is None:
            if not forwarded and stop_file.is_file():
                process.send_signal(getattr(signal, stop_file.read_text().strip() or "SIGTERM"))
                forwarded = True
            time.sleep(POLL_S)
    return process.returncode


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when this Ray worker dies (a lost node, a restart of the group),
    so no orphaned rank trains on, or writes a checkpoint, beside the restarted ones."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _judge(status: int, rank: int, result_file: Path, log_file: Path) -> None:
    if status in (0, EXIT_TERMINATED):
        return
    outcome = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if outcome.get("error_type") in INPUT_ERROR_TYPES:
        return
    cause = f"{outcome['error_type']}: {outcome.get('message')}" if outcome.get("error_type") else "no error reported"
    last = "\n".join(log_file.read_text(errors="replace").splitlines()[-12:])
    raise RankFailed(
        f"rank {rank} on {socket.gethostname()} exited with status {status} ({cause}); its log: {log_file}; "
        f"last lines:\n{last}"
    )
