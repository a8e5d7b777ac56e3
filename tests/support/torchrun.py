"""The training worker on two CPU processes under torchrun (gloo), bounded by a timeout so a hang fails the test; and
what tests need to reach a job's ranks (their pids, an action once a checkpoint exists, a free rendezvous port)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from wmtp_core.launch.torchrun import worker_command
from wmtp_core.run.plan import plan_run, write_plan


def torchrun_worker(
    recipe, run_dir: Path, *, resume: str | Path | None = None, timeout: int = 240
) -> tuple[subprocess.CompletedProcess, dict]:
    """Plan recipe's run in run_dir (from resume: "latest" or a checkpoint directory) and train it on
    devices.nproc_per_node processes; return the finished launcher and rank 0's outcome, asserting success."""
    planned = plan_run(recipe, resume=resume, directory=run_dir)
    result = run_dir / "result.json"
    command = worker_command(planned.plan, write_plan(planned), result_file=result, every_rank_on_console=True)
    # faulthandler: a rank that dies of a signal prints every thread's Python stack into the failure message.
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out, json.loads(result.read_text())


def rank_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of every worker rank executing run_dir's plan now (torchrun itself and other jobs left out)."""
    plan = str(run_dir / "plan.json").encode()
    found = {}
    for entry in (e for e in Path("/proc").iterdir() if e.name.isdigit()):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except (OSError, ValueError):  # the process ended while we looked
            continue
        if plan in argv and b"torch.distributed.run" not in argv and b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry.name)
    return found


def when_exists(path: Path, action, *, within_s: float = 120) -> threading.Thread:
    """Run action() in a thread as soon as path exists (or after within_s, so a test fails instead of hanging)."""

    def wait_then_act():
        deadline = time.monotonic() + within_s
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
