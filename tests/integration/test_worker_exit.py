"""How a training worker process (`python -m wmtp_core.training.worker`) ends: SIGTERM saves a checkpoint at the step
reached and exits 143; a cancelled run leaks no semaphores, except on the legacy path (phases.api off), which
reproduces the leak the fix plan reports; a rank that exits without interpreter teardown still releases them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.recipes import with_sections
from support.training import plan_and_train

from wmtp_core.checkpoint.manifest import latest_valid_checkpoint
from wmtp_core.launch.torchrun import worker_command
from wmtp_core.run.plan import plan_run, write_plan


def start_worker(recipe, run_dir: Path, **popen) -> subprocess.Popen:
    """The worker training recipe in run_dir (its outcome in run_dir/result.json), stdout as text lines."""
    planned = plan_run(recipe, directory=run_dir)
    command = worker_command(planned.plan, write_plan(planned), result_file=run_dir / "result.json")
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **popen)


def wait_for_checkpoint(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / f"step_{step:08d}").exists():
        assert process.poll() is None, f"worker ended early: {process.stdout.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_non_zero(tiny_recipe, tmp_path):
    recipe = with_sections(
        tiny_recipe, train={"max_steps": 3000, "save_every": 50, "log_every": 1000, "eval_every": 5000}
    )
    worker = start_worker(recipe, tmp_path, stderr=subprocess.STDOUT)
    wait_for_checkpoint(tmp_path, 50, worker)
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 143, output[-2000:]
    outcome = json.loads((tmp_path / "result.json").read_text())
    assert outcome["error_type"] == "TrainingInterrupted"
    latest = latest_valid_checkpoint(tmp_path)
    assert 50 < latest.step < 3000 and latest.step % 50 != 0  # saved where it stopped, not at a save interval
    assert f"SIGTERM at step {latest.step}" in outcome["message"]
    longer = with_sections(recipe, train={"max_steps": latest.step + 2})
    resumed = plan_and_train(longer, tmp_path, resume_from=latest.path)
    assert resumed.resumed_from_step == latest.step and resumed.steps == latest.step + 2


def _cancel_mid_training(recipe, run_dir) -> tuple[int, str]:
    """Run the worker with a spawned DataLoader worker, SIGTERM it at step 3, return (status, stderr)."""
    worker = start_worker(recipe, run_dir, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "always"})
    for line in worker.stdout:
        if " step 3/" in line:
            break
    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=120)  # bounded: orphaned workers could keep the pipes open
    return worker.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("api", [True, False])
def test_cancelled_run_leaks_semaphores_only_on_the_legacy_path(tiny_recipe, tmp_path, api):
    recipe = with_sections(
        tiny_recipe,
        train={"max_steps": 2000, "save_every": 1000, "log_every": 1},
        data={"num_workers": 1, "worker_start": "spawn"},
        phases={"api": api},
    )
    status, stderr = _cancel_mid_training(recipe, tmp_path / "run")
    if api:
        assert status == 143 and "leaked semaphore" not in stderr and "Warning" not in stderr, stderr[-2000:]
    else:
        assert status == -signal.SIGTERM and "leaked semaphore objects" in stderr


RANK_EXIT_WITH_A_LIVE_LOADER_QUEUE = """
import torch
from torch.utils.data import DataLoader
from wmtp_core.training.worker import exit_without_interpreter_teardown

if __name__ == "__main__":
    batches = iter(DataLoader(list(range(16)), batch_size=4, num_workers=1, multiprocessing_context="spawn"))
    next(batches)
    batches._shutdown_workers()  # the worker is gone; its queues (semaphores) are still referenced
    exit_without_interpreter_teardown(0)
"""


@pytest.mark.slow
def test_a_rank_exiting_without_interpreter_teardown_still_releases_its_semaphores(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_EXIT_WITH_A_LIVE_LOADER_QUEUE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "leaked semaphore" not in out.stderr
