"""SIGKILL trials (benchmarks/kill_soak.py runs many; tests/integration/test_kill_resume.py runs one of each kind).

A trial trains the tiny model in a subprocess (`python -m wmtp_core.training.worker`), SIGKILLs it at a random moment
during training or while a checkpoint is being written, then resumes from the newest valid checkpoint until the run
completes, and compares the final weights with an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from wmtp_core.checkpoint.manifest import checkpoints_dir, latest_valid_checkpoint
from wmtp_core.launch.torchrun import worker_command
from wmtp_core.recipes import TINY_MODEL, load_recipe
from wmtp_core.run.plan import plan_run, write_plan

KILL_RUN = [
    "seed=7",
    "train.warmup_steps=1",
    "train.eval_batches=2",
    "train.max_steps=60",
    "train.save_every=5",
    "train.keep_last=2",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.lr_decay_steps=60",
]


@dataclass(frozen=True)
class TrialResult:
    moment: str
    killed_at_step: int | None  # newest valid checkpoint right after the kill
    during_save: bool  # a half-written checkpoint directory was left behind
    resumes: int
    identical: bool


def kill_recipe():
    return load_recipe(None, [*TINY_MODEL, *KILL_RUN])


def start(run_dir: Path, *, resume: bool) -> subprocess.Popen:
    """The worker training the kill recipe in run_dir, planned as a flow run plans it (resume: from the newest valid
    checkpoint, or fresh when the kill came before the first save)."""
    recipe = kill_recipe()
    try:
        planned = plan_run(recipe, resume="latest" if resume else None, directory=run_dir)
    except FileNotFoundError:
        planned = plan_run(recipe, directory=run_dir)
    command = worker_command(planned.plan, write_plan(planned), result_file=run_dir / "result.json")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = latest_valid_checkpoint(run_dir)
    assert latest is not None and latest.step == 60, f"run in {run_dir} did not complete"
    return load_file(latest.path / "model.safetensors")


def uninterrupted(run_dir: Path) -> dict[str, torch.Tensor]:
    process = start(run_dir, resume=False)
    process.communicate(timeout=300)
    assert process.returncode == 0
    return final_weights(run_dir)


def run_trial(run_dir: Path, reference: dict[str, torch.Tensor], *, moment: str, rng: random.Random) -> TrialResult:
    """One SIGKILL at `moment` ('training' or 'save'), then resumes until the run completes."""
    process = start(run_dir, resume=False)
    if moment == "save":
        _wait_for_checkpoint(run_dir, process, at_least=rng.choice(range(5, 55, 5)))
        _wait_for_a_save_in_progress(run_dir, process)
    else:
        _wait_for_step(process, rng.randint(6, 58))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    latest = latest_valid_checkpoint(run_dir)
    during_save = any(p.name.startswith(".tmp-") for p in checkpoints_dir(run_dir).iterdir())
    resumes = 0
    while latest_valid_checkpoint(run_dir).step < 60:
        resumes += 1
        resumed = start(run_dir, resume=True)
        resumed.communicate(timeout=300)
        assert resumed.returncode == 0
    actual = final_weights(run_dir)
    identical = actual.keys() == reference.keys() and all(torch.equal(actual[k], reference[k]) for k in reference)
    return TrialResult(moment, latest.step if latest else None, during_save, resumes, identical)


def _wait_for_step(process: subprocess.Popen, step: int) -> None:
    """Read the worker's progress lines until it reports `step` (it logs every step)."""
    for line in process.stdout:
        if f" step {step}/" in line:
            return
    raise AssertionError(f"worker ended before step {step}")


def _wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, *, at_least: int) -> None:
    """Wait until a checkpoint of step >= at_least is valid; the kill then lands in one of the following saves."""
    deadline = time.monotonic() + 120
    while (latest := latest_valid_checkpoint(run_dir)) is None or latest.step < at_least:
        assert process.poll() is None and time.monotonic() < deadline, f"worker ended before step {at_least}"
        time.sleep(0.005)


def _wait_for_a_save_in_progress(run_dir: Path, process: subprocess.Popen) -> None:
    """Spin until a staging directory exists (a save has started); the kill follows at once."""
    parent = checkpoints_dir(run_dir)
    while process.poll() is None:
        if any(entry.name.startswith(".tmp-") for entry in parent.iterdir()):
            return
