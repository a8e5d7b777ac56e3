"""The training worker on two CPU processes under torchrun (gloo), bounded by a timeout so a hang fails the test."""

from __future__ import annotations

import json
import os
import subprocess
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
