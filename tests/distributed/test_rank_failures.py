"""A failed torchrun job names the rank (or node) that died or stopped first, from that rank's own evidence (its exit
signal, its process state, its heartbeat) with its own last lines, never the rank that only lost its peer; a
multi-node job writes the other nodes' exact command, and a relaunch does not wait long for a node that is gone."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.log_lines import Lines
from support.recipes import TINY_OVERRIDES
from support.torchrun import free_port, rank_pids, when_exists

from wmtp_core.checkpoint.manifest import latest_valid_checkpoint
from wmtp_core.launch.job_signals import child_pids
from wmtp_core.launch.torchrun import run_job, worker_command
from wmtp_core.layout import RunLayout
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import plan_run, write_plan

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # each runs torchrun jobs of 10-40 s
LONG_RUN = ["train.max_steps=5000", "train.save_every=5", "train.eval_every=100000", "devices.strategy=ddp"]


def job(run_dir: Path, *overrides: str, resume=None, manifest_extra=None) -> tuple[list[str], Path]:
    recipe = load_recipe(None, [*TINY_OVERRIDES, *LONG_RUN, *overrides])
    planned = plan_run(recipe, directory=run_dir, resume=resume)
    result = RunLayout(run_dir).torchrun_result
    command = worker_command(planned.plan, write_plan(planned), result_file=result, manifest_extra=manifest_extra)
    return command, result


def run(command: list[str], result: Path, *, timeout_s: float, log: logging.Logger | None = None) -> dict:
    log = log or logging.getLogger("test-rank-failures")
    return run_job(command, result_file=result, silence_timeout_s=timeout_s, log=log, on_metrics=None)


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def test_a_sigkilled_rank_is_named_by_its_signal_with_its_own_last_lines_and_the_run_resumes(tmp_path):
    command, result = job(tmp_path, "devices.nproc_per_node=2")
    when_exists(checkpoint(tmp_path, 5), lambda: os.kill(rank_pids(tmp_path)[1], signal.SIGKILL))
    with pytest.raises(RuntimeError) as failed:
        run(command, result, timeout_s=60)
    said, last = str(failed.value).split("last lines:\n")
    assert "\n" not in said  # one line for the user, then rank 1's own lines
    assert (
        said.startswith("torchrun exited with status 1: rank 1 failed first (node 0, ") and "killed by SIGKILL" in said
    )
    assert "Connection reset" not in said and "rank 0 failed first" not in said  # rank 0 only lost its peer
    assert "[rank 1] started" in last and "elastic" not in last and "Traceback" not in last  # not torchrun's
    assert rank_pids(tmp_path) == {}
    saved = latest_valid_checkpoint(tmp_path).step
    assert saved >= 5
    # The newest complete checkpoint verifies and resumes (on one process here: the cheapest resume).
    command, result = job(tmp_path, f"train.max_steps={saved + 2}", resume="latest")
    assert run(command, result, timeout_s=60)["steps"] == saved + 2


def test_a_stopped_rank_is_named_as_stopped_when_the_job_falls_silent(tmp_path):
    # devices.timeout_s also bounds rank 0's wait in its collective: whichever ends first, rank 1 is named. (15 s:
    # the ranks' start, silent, takes up to 10 s on a busy machine.)
    command, result = job(tmp_path, "devices.nproc_per_node=2", "devices.timeout_s=15")
    stopped_at = []

    def stop_rank_1():
        os.kill(rank_pids(tmp_path)[1], signal.SIGSTOP)
        stopped_at.append(time.monotonic())

    when_exists(checkpoint(tmp_path, 5), stop_rank_1)
    try:
        with pytest.raises((TimeoutError, RuntimeError)) as failed:
            run(command, result, timeout_s=15)
        ended_after = time.monotonic() - stopped_at[0]
    finally:
        for pid in rank_pids(tmp_path).values():  # a rank left stopped never ends on its own
            os.kill(pid, signal.SIGKILL)
    said = str(failed.value).splitlines()[0]
    assert "rank 1 (node 0, " in said or "rank 1 failed first (node 0, " in said
    assert "stopped (SIGSTOP" in said and "probably stuck" not in said
    assert ended_after < 25  # the silence timeout (15 s) and a kill; torchrun alone would wait 30 s more for it
    assert latest_valid_checkpoint(tmp_path).step >= 5


def start_other_node(script: Path, out: Path) -> subprocess.Popen:
    """The second node: `bash runs/<run>/other-nodes.sh`, as the docs say, in a session of its own."""
    with out.open("w") as log:
        return subprocess.Popen(["bash", str(script)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_node(node: subprocess.Popen) -> None:
    """A lost node: its torchrun and its ranks SIGKILLed at once."""
    for pid in [*child_pids(node.pid), node.pid]:
        os.kill(pid, signal.SIGKILL)


def test_two_nodes_run_the_written_command_and_a_lost_node_is_named_then_not_waited_for(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    two_nodes, nodes = ["devices.nnodes=2", "devices.nproc_per_node=1", "devices.timeout_s=60"], []
    try:
        # Item 7: node 1 runs the file node 0 wrote; an argument holding a space (the JSON) arrives whole.
        done = tmp_path / "done"
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        command, result = job(done, *two_nodes, "train.max_steps=6", manifest_extra={"tracking_run_id": None})
        script, streamed = RunLayout(done).other_nodes, Lines()
        log = logging.getLogger("test-two-nodes")
        log.handlers[:], log.propagate = [streamed], False
        log.setLevel(logging.INFO)
        when_exists(script, lambda: nodes.append(start_other_node(script, tmp_path / "node1-done.log")))
        assert run(command, result, timeout_s=60, log=log)["steps"] == 6
        assert nodes[0].wait(timeout=30) == 0
        assert f"launching: {shlex.join(command)}" in streamed.lines
        assert f"the other 1 node(s) run: bash {script}" in streamed.lines
        assert shlex.split(script.read_text().splitlines()[-1]) == ["exec", *command]
        assert json.loads(result.read_text())["ok"] and not list(done.glob("torchrun_result.rank*"))  # one writer

        # Node 1 lost mid-run: node 0 names it, not itself (it only lost its peer).
        lost = tmp_path / "lost"
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        command, result = job(lost, *two_nodes)
        script = RunLayout(lost).other_nodes
        when_exists(script, lambda: nodes.append(start_other_node(script, tmp_path / "node1-lost.log")))
        when_exists(checkpoint(lost, 5), lambda: kill_node(nodes[-1]))
        with pytest.raises(RuntimeError) as failed:
            run(command, result, timeout_s=60)
        said = str(failed.value).splitlines()[0]
        assert "rank 1 failed first (node 1, " in said and "rank 0 failed first" not in said

        # The retry: node 1 is gone, so the rendezvous fails in seconds naming it, not after devices.timeout_s.
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="did not come back") as refused:
            run(command, result, timeout_s=60)
        waited = time.monotonic() - started
        print(f"the relaunch without node 1 failed after {waited:.1f} s")
        assert "node 1 did not come back" in str(refused.value) and f"bash {script}" in str(refused.value)
        assert waited < 25  # REJOIN_WAIT_S (10 s) and torchrun's start, against devices.timeout_s=60
        assert latest_valid_checkpoint(lost).step >= 5
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)


OVERWRITTEN_OUTCOME = """
import json, sys
# Two outcomes in one file: what two writers without a rename left behind ("Extra data").
open(sys.argv[1], "w").write(json.dumps({"ok": True, "result": {}}) + json.dumps({"ok": False}))
"""

RACING_WRITER = """
import json, sys
from pathlib import Path
from wmtp_core.runtime.atomic_files import write_atomically
for i in range(300):
    write_atomically(Path(sys.argv[1]), json.dumps({"ok": True, "result": {"pad": "x" * int(sys.argv[2])}}))
"""


def test_the_outcome_has_one_atomic_writer_and_an_unparseable_one_is_named_not_a_traceback(tmp_path):
    result = tmp_path / "torchrun_result.json"
    writers = [subprocess.Popen([sys.executable, "-c", RACING_WRITER, str(result), size]) for size in ("10", "900")]
    while any(writer.poll() is None for writer in writers):  # two jobs of one run writing: whole outcomes only
        if result.is_file():
            assert json.loads(result.read_text())["ok"]
    assert [writer.returncode for writer in writers] == [0, 0]
    with pytest.raises(RuntimeError, match="does not parse") as failed:
        run([sys.executable, "-c", OVERWRITTEN_OUTCOME, str(result)], result, timeout_s=30)
    assert str(result) in str(failed.value) and "\n" not in str(failed.value)
