"""Stopping early never loses work: a time budget and Ctrl-C save a checkpoint at the step reached (SIGTERM does
too: tests/integration/test_worker_exit.py), a second Ctrl-C aborts at once; async saves never leave a write pending
(that they write what synchronous saves write: tests/unit/test_async_staging.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from support.recipes import with_sections
from support.training import plan_and_train

from wmtp_core.checkpoint import run_state
from wmtp_core.checkpoint.manifest import CheckpointError, latest_valid_checkpoint
from wmtp_core.checkpoint.writer import CheckpointWriter


def _train(recipe, run_dir, **kwargs):
    return plan_and_train(recipe, run_dir, **kwargs)


def test_time_budget_saves_at_the_step_reached_and_resume_finishes(tiny_recipe, tmp_path):
    recipe = with_sections(tiny_recipe, train={"max_steps": 8, "save_every": 100})
    stopped = _train(recipe, tmp_path, time_budget_s=0.0)
    assert stopped.stop_reason == "time budget" and stopped.steps == 1
    assert latest_valid_checkpoint(tmp_path).step == 1
    finished = _train(recipe, tmp_path, resume_from=latest_valid_checkpoint(tmp_path).path)
    assert finished.stop_reason is None and finished.resumed_from_step == 1 and finished.steps == 8


def _ctrl_c_at(step: int, times: int = 1):
    """A metrics callback that presses Ctrl-C `times` times (SIGINT to this process) when step is reported."""

    def report(reported: int, metrics: dict) -> None:
        for _ in range(times if reported == step else 0):
            os.kill(os.getpid(), signal.SIGINT)

    return report


def test_ctrl_c_saves_at_the_step_reached_and_returns_a_stopped_run(tiny_recipe, tmp_path):
    recipe = with_sections(tiny_recipe, train={"max_steps": 50, "save_every": 100, "log_every": 1})
    handler_before = signal.getsignal(signal.SIGINT)
    stopped = _train(recipe, tmp_path, on_metrics=_ctrl_c_at(3))
    assert (stopped.stop_reason, stopped.steps) == ("Ctrl-C", 3)
    assert latest_valid_checkpoint(tmp_path).step == 3
    assert signal.getsignal(signal.SIGINT) is handler_before  # Ctrl-C means KeyboardInterrupt again after training


def test_a_second_ctrl_c_aborts_at_once_without_saving(tiny_recipe, tmp_path):
    recipe = with_sections(tiny_recipe, train={"max_steps": 50, "save_every": 100, "log_every": 1})
    with pytest.raises(KeyboardInterrupt):
        _train(recipe, tmp_path, on_metrics=_ctrl_c_at(3, times=2))
    assert latest_valid_checkpoint(tmp_path) is None  # no save after the first Ctrl-C was waited for


def test_async_save_prunes_after_each_write_and_leaves_nothing_half_written(tiny_recipe, tmp_path):
    recipe = with_sections(
        tiny_recipe, train={"max_steps": 6, "save_every": 2, "keep_last": 2}, checkpoint={"async_save": True}
    )
    result = _train(recipe, tmp_path)
    assert Path(result.latest_checkpoint).name == "step_00000006"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


def test_background_write_failure_is_raised_not_lost(tmp_path):
    writer = CheckpointWriter(background=True)

    def failing_write() -> Path:
        raise OSError("disk full")

    writer.submit(failing_write)
    with pytest.raises(CheckpointError, match="disk full"):
        writer.wait()


def test_at_most_one_background_write_is_in_flight(tmp_path):
    writer, running, overlaps = CheckpointWriter(background=True), [], []

    def slow_write(name: str) -> Path:
        overlaps.append(len(running))
        running.append(name)
        time.sleep(0.1)
        running.remove(name)
        return tmp_path / name

    for name in ("a", "b", "c"):
        writer.submit(lambda name=name: slow_write(name))
    assert writer.wait() == tmp_path / "c"
    assert overlaps == [0, 0, 0]


def test_sync_save_returns_before_it_settles_and_wait_waits_for_the_settling(tmp_path):
    writer, settled, disk_flushed = CheckpointWriter(background=False), [], threading.Event()

    def slow_settle(path: Path) -> None:
        disk_flushed.wait(timeout=10)
        settled.append(path)

    writer.submit(lambda: tmp_path / "a", slow_settle)
    assert settled == []  # submit returned while the settling still waits: training goes on while the disk flushes
    assert writer.latest == tmp_path / "a"
    disk_flushed.set()
    assert writer.wait() == tmp_path / "a" and settled == [tmp_path / "a"]


def test_next_save_starts_only_after_the_previous_one_settled(tmp_path):
    writer, events = CheckpointWriter(background=False), []

    def settle(path: Path) -> None:
        time.sleep(0.1)
        events.append(f"settled {path.name}")

    def write(name: str) -> Path:
        events.append(f"write {name}")
        return tmp_path / name

    for name in ("a", "b"):
        writer.submit(lambda name=name: write(name), settle)
    writer.wait()
    assert events == ["write a", "settled a", "write b", "settled b"]


def test_settle_failure_of_a_sync_save_is_raised_not_lost(tmp_path):
    writer = CheckpointWriter(background=False)

    def failing_settle(path: Path) -> None:
        raise OSError("fsync: input/output error")

    writer.submit(lambda: tmp_path / "a", failing_settle)
    with pytest.raises(CheckpointError, match="input/output error"):
        writer.wait()


@pytest.mark.parametrize("async_save", [False, True])
def test_older_checkpoints_are_pruned_only_after_the_newest_is_fsynced(tiny_recipe, tmp_path, monkeypatch, async_save):

    on_disk_at_fsync, real_make_durable = {}, run_state.make_durable

    def recording_make_durable(path: Path) -> None:
        on_disk_at_fsync[path.name] = sorted(p.name for p in path.parent.iterdir() if p.name.startswith("step_"))
        real_make_durable(path)

    monkeypatch.setattr(run_state, "make_durable", recording_make_durable)
    recipe = with_sections(
        tiny_recipe, train={"max_steps": 6, "save_every": 2, "keep_last": 2}, checkpoint={"async_save": async_save}
    )
    _train(recipe, tmp_path)
    # While step 6 was being made durable, steps 2 and 4 were still there (a crash then leaves 4 to resume from).
    assert on_disk_at_fsync["step_00000006"] == ["step_00000002", "step_00000004", "step_00000006"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
