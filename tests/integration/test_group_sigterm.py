"""SIGTERM to the whole process group of `wmtp train` (what `timeout`, systemd and Slurm send): the run stops at the
next step with a checkpoint, ends `stopped`, and the command exits 143 within the 30 s grace, leaving no process and
no temporary Prefect server behind. The command runs without PREFECT_API_URL, so it starts that server itself."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from support.cli import WMTP, wmtp_environment
from support.training import plan_and_train

from wmtp_core.checkpoint.manifest import latest_valid_checkpoint
from wmtp_core.recipes import load_recipe

GRACE_S = 30  # docs/distributed.md: one step plus one save must fit in it
LONG_RUN = ["train.max_steps=5000", "train.save_every=20", "train.eval_every=100000", "train.log_every=10"]


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the "(name)" field: state, ppid, pgrp, session, ...; None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(process: tuple[int, str]) -> bool:
    """Whether (pid, start time) still runs (a zombie counts as gone; the start time tells a reused pid apart)."""
    fields = _stat_fields(process[0])
    return fields is not None and fields[0] != "Z" and fields[19] == process[1]


def _processes_of(root: int, session: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process in the session, and of every descendant of root (in any session)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            table[int(entry.name)] = fields
    found, frontier = set(), {root}
    while frontier:
        found |= frontier
        frontier = {pid for pid, fields in table.items() if int(fields[1]) in frontier} - found
    found |= {pid for pid, fields in table.items() if int(fields[3]) == session}
    return {(pid, table[pid][19]) for pid in found if pid in table}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # ended meanwhile
        return b""


def _port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ranks(processes: set[tuple[int, str]]) -> list[int]:
    """The torchrun ranks among processes (torchrun gives each its LOCAL_RANK)."""
    ranks = []
    for pid, _ in processes:
        try:
            if b"\0LOCAL_RANK=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                ranks.append(pid)
        except OSError:  # ended meanwhile
            continue
    return ranks


def _train_then_sigterm_the_group(
    recipe: Path, home: Path, name: str, extra: list[str], *, once: str = "checkpoints/step_00000040", ranks_too=False
) -> dict:
    """Start `wmtp train` in a process group of its own, SIGTERM the group (and, ranks_too, every torchrun rank as
    Slurm does) once the run directory has `once` (by default a checkpoint, with further steps under way); return
    what happened: exit status, seconds from the signal to the exit and to the stop checkpoint, output, the
    processes seen, the temporary server's port."""
    command = [WMTP, "train", "--recipe", str(recipe), "-n", name, *[f"--set={s}" for s in [*LONG_RUN, *extra]]]
    cli = subprocess.Popen(
        command, env=wmtp_environment(home), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    awaited = home / "runs" / name / once
    seen: set[tuple[int, str]] = set()
    deadline = time.monotonic() + 240
    while not awaited.exists() and cli.poll() is None and time.monotonic() < deadline:
        seen |= _processes_of(cli.pid, cli.pid)
        time.sleep(0.2)
    assert cli.poll() is None, f"wmtp train ended before the signal: {cli.stderr.read()[-3000:]}"
    seen |= _processes_of(cli.pid, cli.pid)
    signalled = time.time()
    os.killpg(cli.pid, signal.SIGTERM)
    ranks = _ranks(seen)
    for rank in ranks if ranks_too else []:
        os.kill(rank, signal.SIGTERM)
    try:
        _, stderr = cli.communicate(timeout=GRACE_S + 60)
    except subprocess.TimeoutExpired:
        for pid, _ in _processes_of(cli.pid, cli.pid):
            os.kill(pid, signal.SIGKILL)
        _, stderr = cli.communicate()
        pytest.fail(f"wmtp train still ran {GRACE_S + 60} s after a group SIGTERM: {stderr[-3000:]}")
    exited = time.time()
    latest = latest_valid_checkpoint(home / "runs" / name)
    port = re.search(r"temporary Prefect server on http://127\.0\.0\.1:(\d+)", stderr)
    return {
        "status": cli.returncode,
        "to_exit_s": exited - signalled,
        "to_checkpoint_s": latest.path.stat().st_mtime - signalled if latest else None,
        "latest": latest,
        "stderr": stderr,
        "seen": seen,
        "ranks": ranks,
        "port": int(port.group(1)) if port else None,
    }


def _assert_stopped_in_order(outcome: dict, home: Path, name: str, *, torchruns_own_report: int = 0) -> None:
    """torchruns_own_report: the tracebacks torchrun prints of itself (its SignalException on the SIGTERM passed on,
    streamed into the task log; launched by wmtp_core/launch/torchrun.py), the only ones allowed."""
    stderr = outcome["stderr"]
    assert outcome["status"] == 143, stderr[-3000:]
    assert outcome["to_exit_s"] < GRACE_S, (outcome["to_exit_s"], stderr[-3000:])
    latest = outcome["latest"]
    assert latest is not None and latest.step >= 40 and outcome["to_checkpoint_s"] < GRACE_S, outcome
    steps = sorted(int(c.name.removeprefix("step_")) for c in (home / "runs" / name / "checkpoints").glob("step_*"))
    assert [s for s in steps if s % 20] in ([], [latest.step]), steps  # one stop save (save_every 20), not two
    summary = json.loads((home / "runs" / name / "summary.json").read_text())
    assert (summary["status"], summary["stop_reason"], summary["steps"]) == ("stopped", "SIGTERM", latest.step)
    assert f"stopped by the SIGTERM at step {latest.step}" in stderr and f"wmtp resume {name}" in stderr
    assert stderr.count("Traceback") == stderr.count("SignalException: Process") == torchruns_own_report, stderr
    _assert_nothing_left(outcome)


def _assert_nothing_left(outcome: dict) -> None:
    left = sorted(pid for pid, start in outcome["seen"] if _alive((pid, start)))
    assert not left, f"processes left after the exit: {left}"
    assert outcome["port"] is not None and not _port_answers(outcome["port"]), "the temporary server is still up"


def _resumes_from(home: Path, name: str, step: int) -> None:
    """The stop checkpoint resumes (here, on one process: the CLI's own resume is tested in test_cli_end_to_end)."""
    run_dir = home / "runs" / name
    recipe = load_recipe(run_dir / "recipe.yaml", ["devices.nproc_per_node=1", f"train.max_steps={step + 2}"])
    resumed = plan_and_train(recipe, run_dir, resume_from=run_dir / "checkpoints" / f"step_{step:08d}")
    assert (resumed.resumed_from_step, resumed.steps) == (step, step + 2)


@pytest.fixture
def recipe_file(tmp_path, tiny_recipe) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe.model_dump(mode="json")))
    return path


@pytest.mark.slow
def test_a_group_sigterm_stops_the_run_with_a_checkpoint_and_exits_143(recipe_file, tmp_path):
    home = tmp_path / "home"
    outcome = _train_then_sigterm_the_group(recipe_file, home, "grouped", [])
    print(f"in process: exit {outcome['to_exit_s']:.1f} s, checkpoint {outcome['to_checkpoint_s']:.1f} s after")
    _assert_stopped_in_order(outcome, home, "grouped")
    _resumes_from(home, "grouped", outcome["latest"].step)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_group_sigterm_under_torchrun_stops_every_rank_once_and_exits_143(recipe_file, tmp_path):
    home = tmp_path / "home"
    torchrun = ["devices.launcher=torchrun", "devices.nproc_per_node=2", "devices.strategy=ddp"]
    outcome = _train_then_sigterm_the_group(recipe_file, home, "grouped-ranks", torchrun, ranks_too=True)
    print(f"torchrun: exit {outcome['to_exit_s']:.1f} s, checkpoint {outcome['to_checkpoint_s']:.1f} s after")
    assert len(outcome["ranks"]) == 2
    _assert_stopped_in_order(outcome, home, "grouped-ranks", torchruns_own_report=1)
    _resumes_from(home, "grouped-ranks", outcome["latest"].step)


@pytest.mark.slow
def test_a_group_sigterm_before_training_ends_the_command_with_one_line(recipe_file, tmp_path):
    home = tmp_path / "home"
    outcome = _train_then_sigterm_the_group(recipe_file, home, "early", [], once="plan.json")
    stderr = outcome["stderr"]
    assert outcome["status"] == 143 and outcome["to_exit_s"] < GRACE_S, (outcome["to_exit_s"], stderr[-3000:])
    assert "run early ended by SIGTERM outside a training step: no checkpoint was saved yet" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    _assert_nothing_left(outcome)


@pytest.mark.slow
def test_the_temporary_server_ends_itself_when_the_command_is_killed(recipe_file, tmp_path):
    """SIGKILL runs no exit handler: the server, in a session of its own, must notice that its parent is gone."""
    home = tmp_path / "home"
    command = [WMTP, "train", "--recipe", str(recipe_file), "-n", "killed", *[f"--set={s}" for s in LONG_RUN]]
    cli = subprocess.Popen(command, env=wmtp_environment(home), stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (home / "runs" / "killed" / "plan.json").exists() and cli.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    servers = [p for p in _processes_of(cli.pid, cli.pid) if b"uvicorn" in _cmdline(p[0])]
    os.kill(cli.pid, signal.SIGKILL)
    cli.wait()
    deadline = time.monotonic() + 20  # its parent checked every second, 10 s for a server still starting
    while any(_alive(server) for server in servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid, start in servers if _alive((pid, start))]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert len(servers) == 1 and not left, servers
