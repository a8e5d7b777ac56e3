"""A resume refused because another process trains the run touches nothing of that run: not its summary, plan,
recipe, tracking file or logs, nor its MLflow run's status; the live trainer goes on and completes normally.

Through the CLI both trainers are the real `wmtp` console script (one Prefect test server, the embedded MLflow store
under the run's $WMTP_HOME), the second started while the first trains; the flows a deployment runs are refused the
same way while another process holds the run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.cli import WMTP, wmtp_environment
from support.recipes import TINY_OVERRIDES, with_sections
from support.training import plan_and_train

from flows.resume import wmtp_resume
from flows.train import wmtp_train

pytestmark = pytest.mark.slow  # the first trainer trains for about 30 s

RUN = "contended"
STEPS = 3000  # about 30 s of the tiny model here: the second is refused and checked well before the first ends
CADENCE = ["train.save_every=500", "train.eval_every=1000", "train.log_every=250", "train.keep_last=2"]


def _snapshot(run_dir: Path) -> dict[str, tuple[str, int, int]]:
    """Every file of the run outside checkpoints/ (what the live trainer writes there is its own business): its
    digest, inode and modification time, so a rewrite with the same bytes is seen too."""
    files = [p for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(run_dir).parts]
    return {
        str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino, p.stat().st_mtime_ns)
        for p in files
    }


def _mlflow_run(home: Path, run_dir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    run = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").get_run(run_id)
    return {"status": run.info.status, "end_time": run.info.end_time, "tags": run.data.tags}


def _wait_for(condition, *, what: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the first trainer ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.2)


def test_a_refused_resume_leaves_the_live_run_untouched_and_it_completes(tmp_path, prefect_api_url):
    home = tmp_path / "home"
    run_dir = home / "runs" / RUN
    env = wmtp_environment(home, api_url=prefect_api_url)
    overrides = [f"--set={o}" for o in [*TINY_OVERRIDES, *CADENCE, f"train.max_steps={STEPS}"]]
    first_out, first_err = tmp_path / "first.out", tmp_path / "first.err"  # files: a full pipe would stall it
    with first_out.open("w") as stdout, first_err.open("w") as stderr:
        first = subprocess.Popen(
            [WMTP, "train", "-n", RUN, *overrides, "--json"], env=env, stdout=stdout, stderr=stderr
        )
    try:
        # training for a while: its MLflow run open, a checkpoint past the first saved
        _wait_for(lambda: (run_dir / "checkpoints" / "step_00000500").is_dir(), what="step 500", process=first)
        before, mlflow_before = _snapshot(run_dir), _mlflow_run(home, run_dir)
        assert mlflow_before["status"] == "RUNNING"

        started = time.monotonic()
        second = subprocess.run(
            [WMTP, "resume", RUN, f"--set=train.max_steps={STEPS + 2}", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        refused_in_s = time.monotonic() - started
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"error: run {RUN} is being trained by pid {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr and second.stdout == ""
        time.sleep(3)  # the damage reported came about 2 s after the refusal
        assert first.poll() is None, f"the first trainer ended before the check (raise STEPS): {STEPS}"

        assert _snapshot(run_dir) == before  # no summary.json, plan, recipe, tracking.json or log written
        assert _mlflow_run(home, run_dir) == mlflow_before  # still RUNNING, no end time, the first's tags
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, first_err.read_text()[-3000:]
    summary = json.loads(first_out.read_text().splitlines()[-1])
    assert (summary["status"], summary["steps"]) == ("completed", STEPS)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert _mlflow_run(home, run_dir)["status"] == "FINISHED"
    print(f"refused in {refused_in_s:.1f} s")


HOLD = """
import sys, time
from pathlib import Path
from wmtp_core.runtime.run_lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_the_flows_refuse_a_run_another_process_trains_at_once_and_write_nothing(
    prefect_api_url, wmtp_home, tiny_recipe
):
    recipe = with_sections(tiny_recipe, run={"name": RUN}, tracking={"enabled": False})
    run_dir = wmtp_home / "runs" / RUN
    plan_and_train(recipe, run_dir)  # 4 steps: the run a scheduled resume continues
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run_dir)
        resumed = wmtp_resume(run_name=RUN, target_steps=8, return_state=True)
        branched = wmtp_train(recipe=with_sections(recipe, train={"max_steps": 8}), resume="latest", return_state=True)
    finally:
        holder.kill()
        holder.wait()
    for state in (resumed, branched):
        assert state.is_failed()
        assert state.message.startswith(f"run {RUN} is being trained by pid {holder.pid} on "), state.message
    assert _snapshot(run_dir) == before
