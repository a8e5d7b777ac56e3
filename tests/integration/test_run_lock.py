"""One trainer per run, held by an OS lock: a live holder in another process is refused by name, holds nested in
the holding process share its hold, the lock is released on any exit and when its holder dies, lock files left by
dead trainers never block, and exactly one of many simultaneous contenders wins."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import WMTP, wmtp_environment
from support.recipes import TINY_OVERRIDES

from wmtp_core.layout import RunLayout
from wmtp_core.recipes import load_recipe, recipe_to_yaml
from wmtp_core.runtime.run_lock import RunLockedError, run_lock

HOLD = """
import sys, time
from pathlib import Path
from wmtp_core.runtime.run_lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""

CONTEND = """
import sys, time
from pathlib import Path
from wmtp_core.runtime.run_lock import RunLockedError, run_lock
go = Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
try:
    with run_lock(Path(sys.argv[1])):
        print("won", flush=True)
        time.sleep(1.0)  # hold it while the others try
except RunLockedError:
    print("refused", flush=True)
"""


def _holder(run_dir: Path, seconds: float = 60) -> subprocess.Popen:
    """A live trainer stand-in: a process that holds the run's lock (returns once it holds it)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def _left_behind(run_dir: Path, host: str, pid: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    RunLayout(run_dir).lock.write_text(json.dumps({"host": host, "pid": pid, "since": "2026-01-01T00:00:00+0000"}))


def _taken_by_another_process(run_dir: Path) -> bool:
    probe = subprocess.run([sys.executable, "-c", HOLD, str(run_dir), "0"], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 or "RunLockedError" in probe.stderr, probe.stderr
    return probe.returncode == 0


def test_holds_nested_in_the_holding_process_share_its_hold_until_the_outermost_ends(tmp_path):
    with run_lock(tmp_path):  # the CLI, around its flow run
        with run_lock(tmp_path):  # the flow, around its training task
            assert not _taken_by_another_process(tmp_path)
        assert not _taken_by_another_process(tmp_path)  # the inner end released nothing
    assert _taken_by_another_process(tmp_path)


def test_lock_is_released_when_training_raises_and_the_file_stays(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run_lock(tmp_path):
            1 / 0
    assert RunLayout(tmp_path).lock.exists()  # never unlinked: unlinking a flock file races
    with run_lock(tmp_path):
        assert json.loads(RunLayout(tmp_path).lock.read_text())["pid"] == os.getpid()


def test_lock_left_by_a_dead_trainer_on_another_host_does_not_block(tmp_path):
    _left_behind(tmp_path, "wmtp-train-pod-7f9c-gone", 1)
    with run_lock(tmp_path):
        assert json.loads(RunLayout(tmp_path).lock.read_text())["host"] == socket.gethostname()


def test_lock_left_on_this_host_with_a_pid_now_reused_does_not_block(tmp_path):
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _left_behind(tmp_path, socket.gethostname(), unrelated.pid)  # a restarted container: same host, live pid
        with run_lock(tmp_path):
            assert json.loads(RunLayout(tmp_path).lock.read_text())["pid"] == os.getpid()
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_live_holder_blocks_and_the_refusal_names_it(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid} on {socket.gethostname()} since "):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_the_kernel_releases_the_lock_when_its_holder_is_killed(tmp_path):
    holder = _holder(tmp_path)
    holder.kill()  # SIGKILL: no finally block runs
    holder.wait()
    with run_lock(tmp_path):
        pass


@pytest.mark.parametrize("attempt", range(3))
def test_exactly_one_of_20_simultaneous_contenders_wins(tmp_path, attempt):
    go = tmp_path / "go"
    contenders = [
        subprocess.Popen(
            [sys.executable, "-c", CONTEND, str(tmp_path / "run"), str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(20)
    ]
    assert all(process.stdout.readline().strip() == "ready" for process in contenders)
    go.touch()  # every contender is now polling for this file
    outcomes = [process.communicate(timeout=60)[0].strip() for process in contenders]
    assert sorted(outcomes) == ["refused"] * 19 + ["won"], outcomes


def _trained_run(run_dir: Path) -> Path:
    """A run as `wmtp train` leaves it (recipe.yaml, checkpoints), trained in-process: the CLI calls are the resumes."""
    from support.training import plan_and_train

    recipe = load_recipe(None, [*TINY_OVERRIDES, "run.name=locked", "tracking.enabled=false"])
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    plan_and_train(recipe, run_dir)
    return run_dir


def _wmtp(args: list[str], home: Path, api_url: str) -> subprocess.CompletedProcess:
    env = wmtp_environment(home, api_url=api_url)
    return subprocess.run([WMTP, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_wmtp_resume_ignores_locks_left_by_dead_trainers_and_refuses_a_live_one(tmp_path, prefect_api_url):
    home = tmp_path / "home"
    run_dir = _trained_run(home / "runs" / "locked")
    _left_behind(run_dir, "wmtp-train-pod-7f9c-gone", 4242)  # a pod that no longer exists
    resumed = _wmtp(["resume", "locked", "--set=train.max_steps=6", "--json"], home, prefect_api_url)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.splitlines()[-1])["steps"] == 6
    _left_behind(run_dir, socket.gethostname(), os.getpid())  # a restarted container: this host, a live pid
    resumed = _wmtp(["resume", "locked", "--set=train.max_steps=8", "--json"], home, prefect_api_url)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    holder = _holder(run_dir)
    try:
        refused = _wmtp(["resume", "locked", "--set=train.max_steps=10"], home, prefect_api_url)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 1
    assert f"is being trained by pid {holder.pid} on {socket.gethostname()}" in refused.stderr
