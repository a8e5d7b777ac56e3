"""An async save's snapshot runs in the background, overlapping the next step's forward and backward: the optimizer
step waits for it, so a checkpoint holds the state of its own step however slow the copy; the copy refills buffers
kept from save to save and copies only what training changes."""

from __future__ import annotations

import time

import pytest
import torch
from support.checkpoints import full_model_state

from wmtp_core.checkpoint.staging import StagingBuffers, live_storages
from wmtp_core.checkpoint.storage import STATE_FILE
from wmtp_core.checkpoint.writer import CheckpointWriter
from wmtp_core.fixplan.gates import plan_run_devices
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.training.loop import train


def _with(recipe, **sections):
    updates = {name: getattr(recipe, name).model_copy(update=values) for name, values in sections.items()}
    return recipe.model_copy(update=updates)


def _train(recipe, run_dir):
    return train(recipe, run_dir, plan=plan_run_devices(recipe, probe_environment()))


def _slow_staging(monkeypatch, seconds: float = 0.3) -> None:
    """Every snapshot starts `seconds` late, so training reaches its next optimizer step before the copy is made."""
    snapshot, stage_shards = StagingBuffers.snapshot, CheckpointWriter.stage_shards

    def late_snapshot(self, *args, **kwargs):
        time.sleep(seconds)
        return snapshot(self, *args, **kwargs)

    def late_stage_shards(self, *args, **kwargs):
        time.sleep(seconds)
        return stage_shards(self, *args, **kwargs)

    monkeypatch.setattr(StagingBuffers, "snapshot", late_snapshot)
    monkeypatch.setattr(CheckpointWriter, "stage_shards", late_stage_shards)


@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_a_slow_snapshot_holds_back_the_next_update_so_every_checkpoint_is_its_own_step(
    tiny_recipe, tmp_path, monkeypatch, checkpoint_format
):
    recipe = _with(
        tiny_recipe, train={"max_steps": 6, "save_every": 2, "keep_last": 3}, checkpoint={"format": checkpoint_format}
    )
    _train(recipe, tmp_path / "sync")
    _slow_staging(monkeypatch)
    _train(_with(recipe, checkpoint={"async_save": True}), tmp_path / "async")
    for step in (2, 4, 6):
        expected = full_model_state(tmp_path / "sync" / "checkpoints" / f"step_{step:08d}")
        actual = full_model_state(tmp_path / "async" / "checkpoints" / f"step_{step:08d}")
        assert all(torch.equal(expected[name], actual[name]) for name in expected), f"step {step} weights differ"


def test_a_slow_snapshot_keeps_the_optimizer_state_of_its_step(tiny_recipe, tmp_path, monkeypatch):
    recipe = _with(tiny_recipe, train={"max_steps": 4, "save_every": 2, "keep_last": 2})
    _train(recipe, tmp_path / "sync")
    _slow_staging(monkeypatch)
    _train(_with(recipe, checkpoint={"async_save": True}), tmp_path / "async")
    for step in (2, 4):
        expected, actual = (
            torch.load(tmp_path / run / "checkpoints" / f"step_{step:08d}" / STATE_FILE, weights_only=True)
            for run in ("sync", "async")
        )
        for key, state in expected["optimizer"]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, actual["optimizer"]["state"][key][name]), f"step {step}: {key}.{name}"


def test_the_optimizer_step_waits_for_a_pending_snapshot_and_the_wait_is_counted(tmp_path):
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    writer, copied = CheckpointWriter(background=True), []
    writer.guard(optimizer)

    def slow_stage() -> None:
        time.sleep(0.3)
        copied.append(weight.detach().clone())

    writer.submit(lambda: tmp_path, stage=slow_stage)
    weight.grad = torch.ones(4)
    optimizer.step()
    writer.wait()
    assert torch.equal(copied[0], torch.ones(4))  # the value before the update
    assert torch.equal(weight.detach(), torch.zeros(4))
    assert writer.staging_wait_s >= 0.2


def test_a_sync_writer_leaves_the_optimizer_alone():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    CheckpointWriter(background=False).guard(optimizer)
    assert not optimizer._optimizer_step_pre_hooks


def test_staging_refills_kept_buffers_and_copies_only_live_tensors():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    fresh = torch.arange(3.0)  # e.g. a state FSDP gathered: already a copy, nothing changes it
    tree = {"model": dict(model.state_dict()), "optimizer": optimizer.state_dict(), "gathered": fresh}
    buffers = StagingBuffers()

    first = buffers.snapshot(tree, live_storages(model, optimizer))
    assert first["gathered"] is fresh
    assert first["model"]["weight"] is not model.weight and torch.equal(first["model"]["weight"], model.weight)
    exp_avg = first["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, optimizer.state[model.weight]["exp_avg"])

    with torch.no_grad():
        model.weight.add_(1.0)
    second = buffers.snapshot(tree, live_storages(model, optimizer))
    assert second["model"]["weight"] is first["model"]["weight"]  # the same buffer, refilled
    assert torch.equal(second["model"]["weight"], model.weight)
