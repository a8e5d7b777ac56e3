"""The training worker on two CPU processes under torchrun (gloo), bounded by a timeout so a hang fails the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from wmtp_core.recipes import recipe_to_yaml
from wmtp_core.training.worker import worker_arguments


def torchrun_worker(
    recipe, run_dir: Path, *, resume: str | None = None, timeout: int = 240
) -> tuple[subprocess.CompletedProcess, dict]:
    """Train recipe in run_dir (its recipe.yaml written there) on 2 processes; return the finished launcher and rank
    0's outcome, asserting the job succeeded."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    result = run_dir / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["--log-dir", str(run_dir / "logs" / "torchrun")]  # not a torchelastic_* directory left in /tmp
    command += worker_arguments(run_dir, result_file=result, resume=resume)
    # faulthandler: a rank that dies of a signal prints every thread's Python stack into the failure message.
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out, json.loads(result.read_text())
