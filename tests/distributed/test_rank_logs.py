"""torchrun logs that survive: every rank's output is kept in the run directory, only rank 0's reaches the task's log,
and a failed job names the rank that failed with the last lines of that rank's own log."""

from __future__ import annotations

import logging

import pytest
from support.log_lines import Lines
from support.recipes import TINY_OVERRIDES

from wmtp_core.launch.torchrun import run_job, worker_command
from wmtp_core.layout import RunLayout
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import plan_run, write_plan

pytestmark = pytest.mark.distributed

# Rank 1 fails as it starts; rank 0 starts training and is stopped by torchrun.
FAULTY_WORKER = """
import os, runpy, sys
rank = os.environ["RANK"]
print(f"rank {rank} starting", flush=True)
if rank == "1":
    print("rank 1 about to fail", file=sys.stderr, flush=True)
    raise RuntimeError("injected failure on rank 1")
runpy.run_module("wmtp_core.training.worker", run_name="__main__", alter_sys=True)
"""


def _two_process_command(run_dir, *, worker=None):
    recipe = load_recipe(None, [*TINY_OVERRIDES, "devices.strategy=ddp", "devices.nproc_per_node=2"])
    planned = plan_run(recipe, directory=run_dir)
    result = run_dir / "result.json"
    command = worker_command(planned.plan, write_plan(planned), result_file=result)
    if worker is not None:
        at = command.index("-m", command.index("--local-ranks-filter"))
        command[at : at + 2] = [str(worker)]
    return command, result


def _logger() -> tuple[logging.Logger, Lines]:
    lines = Lines()
    log = logging.getLogger("test-rank-logs")
    log.handlers[:] = [lines]
    log.setLevel(logging.INFO)
    return log, lines


def test_a_failed_rank_is_named_with_its_own_last_lines_and_every_rank_log_is_kept(tmp_path):
    worker = tmp_path / "faulty_worker.py"
    worker.write_text(FAULTY_WORKER)
    run_dir = tmp_path / "run"
    command, result = _two_process_command(run_dir, worker=worker)
    log, streamed = _logger()
    with pytest.raises(RuntimeError, match="rank 1 failed first") as failed:
        run_job(command, result_file=result, silence_timeout_s=120, log=log, on_metrics=None)
    last_lines = str(failed.value).split("last lines:\n")[1]
    assert "rank 1 about to fail" in last_lines and "RuntimeError: injected failure on rank 1" in last_lines
    (job,) = RunLayout(run_dir).torchrun_logs.iterdir()
    assert str(job) in str(failed.value)
    for rank in (0, 1):
        assert f"rank {rank} starting" in (job / "attempt_0" / str(rank) / "stdout.log").read_text()
    assert "rank 0 starting" in streamed.lines and "rank 1 starting" not in streamed.lines


def test_a_successful_job_streams_rank_0_and_keeps_both_ranks_logs(tmp_path):
    run_dir = tmp_path / "run"
    command, result = _two_process_command(run_dir)
    log, streamed = _logger()
    outcome = run_job(command, result_file=result, silence_timeout_s=120, log=log, on_metrics=None)
    assert outcome["steps"] == 4
    assert any(line.startswith("[rank 0] INFO wmtp_core.training.loop: step 4/4") for line in streamed.lines)
    assert not any(line.startswith(("[rank 1]", "[default")) for line in streamed.lines)
    (job,) = RunLayout(run_dir).torchrun_logs.iterdir()
    assert sorted(p.name for p in (job / "attempt_0").iterdir()) == ["0", "1"]
