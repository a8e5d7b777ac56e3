"""A torchrun job launched by the training task never hangs and never loses work: SIGTERM and Ctrl-C make every rank
stop at the same step with a checkpoint, a second Ctrl-C kills every rank at once, and the whole flow runs 2
processes. (A dead or stopped rank: test_rank_failures.py.)"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from support.recipes import TINY_OVERRIDES

from wmtp_core.checkpoint.manifest import latest_valid_checkpoint
from wmtp_core.launch.torchrun import WorkerInputError, WorkerInterrupted, run_job, worker_command
from wmtp_core.layout import RunLayout
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import plan_run, write_plan

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # every torchrun job takes 5-30 s here
LONG_RUN = [
    "train.max_steps=5000",
    "train.save_every=20",
    "train.log_every=1",
    "train.eval_every=100000",
    "devices.strategy=ddp",
    "devices.nproc_per_node=2",
    "devices.timeout_s=60",
]


def prepared(run_dir: Path, *overrides: str) -> tuple[list[str], Path]:
    recipe = load_recipe(None, [*TINY_OVERRIDES, *LONG_RUN, *overrides])
    planned = plan_run(recipe, directory=run_dir)
    result = run_dir / "result.json"
    return worker_command(planned.plan, write_plan(planned), result_file=result), result


def processes() -> list[tuple[int, list[bytes], dict[bytes, bytes]]]:
    """(pid, argv, environment) of every process this user can read, from /proc."""
    found = []
    for entry in (e for e in Path("/proc").iterdir() if e.name.isdigit()):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(
                line.split(b"=", 1) for line in (entry / "environ").read_bytes().split(b"\0") if b"=" in line
            )
        except (OSError, ValueError):
            continue
        found.append((int(entry.name), argv, environ))
    return found


def worker_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of every wmtp_core.training.worker rank training in run_dir now (other jobs on the machine are
    ignored)."""
    return {
        int(env[b"RANK"]): pid
        for pid, argv, env in processes()
        if b"wmtp_core.training.worker" in argv
        and b"RANK" in env
        and b"torch.distributed.run" not in argv
        and _names(argv, run_dir)
    }


def launcher_pid(run_dir: Path) -> int:
    """The torchrun process whose job trains in run_dir."""
    return next(pid for pid, argv, env in processes() if b"torch.distributed.run" in argv and _names(argv, run_dir))


def _names(argv: list[bytes], run_dir: Path) -> bool:
    """The command line executes run_dir's plan (--plan <run_dir>/plan.json)."""
    return str(RunLayout(run_dir).plan).encode() in argv


def when_checkpoint_exists(run_dir: Path, step: int, action) -> threading.Thread:
    def wait_then_act():
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / f"step_{step:08d}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def test_sigterm_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    command, result = prepared(tmp_path)
    metrics: list[int] = []
    # SIGTERM to the launcher only: torchrun passes it to every rank, as when Prefect cancels a flow run.
    when_checkpoint_exists(tmp_path, 20, lambda: os.kill(launcher_pid(tmp_path), signal.SIGTERM))
    with pytest.raises(WorkerInterrupted, match="SIGTERM at step"):
        run_job(
            command,
            result_file=result,
            silence_timeout_s=60,
            log=logging.getLogger("test"),
            on_metrics=lambda step, values: metrics.append(step),
        )
    latest = latest_valid_checkpoint(tmp_path)
    assert latest.step > 20 and latest.step == max(metrics)  # saved where the job stopped
    assert worker_pids(tmp_path) == {}


def _press_ctrl_c(times: int) -> None:
    """SIGINT to this process, as the terminal sends it: the job runs in a session of its own, so only we get it."""
    for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)


def test_ctrl_c_makes_every_rank_save_at_one_step_and_the_run_end_stopped(tmp_path):
    command, result = prepared(tmp_path)
    when_checkpoint_exists(tmp_path, 20, lambda: _press_ctrl_c(1))
    trained = run_job(command, result_file=result, silence_timeout_s=60, log=logging.getLogger("test"), on_metrics=None)
    assert trained["stop_reason"] == "Ctrl-C"
    assert latest_valid_checkpoint(tmp_path).step == trained["steps"] > 20
    assert worker_pids(tmp_path) == {}


def test_a_second_ctrl_c_kills_every_rank_at_once(tmp_path):
    command, result = prepared(tmp_path)
    pressed: list[float] = []
    when_checkpoint_exists(tmp_path, 20, lambda: (pressed.append(time.monotonic()), _press_ctrl_c(2)))
    with pytest.raises(KeyboardInterrupt):
        run_job(command, result_file=result, silence_timeout_s=60, log=logging.getLogger("test"), on_metrics=None)
    assert time.monotonic() - pressed[0] < 10  # killed, not waited for (torchrun alone waits 30 s for its ranks)
    assert worker_pids(tmp_path) == {}
    assert not [
        pid for pid, argv, env in processes() if b"torch.distributed.run" in argv and str(tmp_path).encode() in argv
    ]
    assert latest_valid_checkpoint(tmp_path).step >= 20  # what was saved before stays valid


def test_flow_trains_two_processes_and_logs_rank_zero_metrics(run_wmtp, prefect_api_url, tmp_path):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    summary = run_wmtp(
        [
            "train",
            "--recipe",
            "configs/tiny.yaml",
            "--set",
            "devices.strategy=fsdp",
            "--set",
            "devices.nproc_per_node=2",
            "--set",
            "run.name=two-procs",
        ],
        home=home,
        api_url=prefect_api_url,
    )
    assert summary["status"] == "completed" and summary["steps"] == 20
    manifest = (Path(summary["latest_checkpoint"]) / "manifest.json").read_text()
    assert '"world_size": 2' in manifest
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    losses = client.get_metric_history(summary["mlflow_run_id"], "loss")
    assert sorted(m.step for m in losses) == [5, 10, 15, 20]


def test_legacy_checkpoint_gate_on_ddp_fails_the_job_visibly(tmp_path):
    command, result = prepared(tmp_path, "phases.checkpoint=false", "train.max_steps=4", "train.save_every=2")
    with pytest.raises(WorkerInputError, match=r"CheckpointSaveError: .*KeyError\(None\).*set phases.checkpoint=true"):
        run_job(command, result_file=result, silence_timeout_s=60, log=logging.getLogger("test"), on_metrics=None)
    assert latest_valid_checkpoint(tmp_path) is None  # nothing half-saved counts as a checkpoint
