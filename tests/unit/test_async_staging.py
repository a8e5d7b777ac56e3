"""An async save's snapshot runs in the background, overlapping the next step's forward and backward: the optimizer
step waits for it, so a checkpoint holds the state of its own step however slow the copy; the copy refills buffers
kept from save to save and copies only what training changes."""

from __future__ import annotations

import time

import pytest
import torch
from support.checkpoints import full_model_state
from support.recipes import with_sections
from support.training import plan_and_train

from wmtp_core.checkpoint import run_state, storage
from wmtp_core.checkpoint.staging import StagingBuffers, live_storages
from wmtp_core.checkpoint.storage import STATE_FILE
from wmtp_core.checkpoint.writer import CheckpointWriter


def _train(recipe, run_dir):
    return plan_and_train(recipe, run_dir)


def _late(action, seconds: float):
    def delayed(*args, **kwargs):
        time.sleep(seconds)
        return action(*args, **kwargs)

    return delayed


def _slow_disk(monkeypatch, seconds: float = 0.3) -> None:
    """Every model-state write starts late, so training runs on while the save is still to write its snapshot."""
    monkeypatch.setattr(storage, "save_safetensors_hashed", _late(storage.save_safetensors_hashed, seconds))
    monkeypatch.setattr(run_state, "write_sharded", _late(run_state.write_sharded, seconds))


def _slow_staging(monkeypatch, seconds: float = 0.3) -> None:
    """Every snapshot starts late, so training reaches its next optimizer step before the copy is made."""
    monkeypatch.setattr(StagingBuffers, "snapshot", _late(StagingBuffers.snapshot, seconds))


@pytest.mark.parametrize("slow", [_slow_disk, _slow_staging], ids=["slow-disk", "slow-snapshot"])
@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_every_async_checkpoint_holds_its_own_step_however_slow_the_save(
    tiny_recipe, tmp_path, monkeypatch, checkpoint_format, slow
):
    """Every checkpoint, not only the last: a write that read the live tensors instead of a snapshot, or a snapshot
    taken after the next update, would differ from the synchronous save's."""
    recipe = with_sections(
        tiny_recipe, train={"max_steps": 6, "save_every": 2, "keep_last": 3}, checkpoint={"format": checkpoint_format}
    )
    _train(recipe, tmp_path / "sync")
    slow(monkeypatch)
    _train(with_sections(recipe, checkpoint={"async_save": True}), tmp_path / "async")
    for step in (2, 4, 6):
        expected = full_model_state(tmp_path / "sync" / "checkpoints" / f"step_{step:08d}")
        actual = full_model_state(tmp_path / "async" / "checkpoints" / f"step_{step:08d}")
        assert all(torch.equal(expected[name], actual[name]) for name in expected), f"step {step} weights differ"


def test_a_slow_snapshot_keeps_the_optimizer_state_of_its_step(tiny_recipe, tmp_path, monkeypatch):
    recipe = with_sections(tiny_recipe, train={"max_steps": 4, "save_every": 2, "keep_last": 2})
    _train(recipe, tmp_path / "sync")
    _slow_staging(monkeypatch)
    _train(with_sections(recipe, checkpoint={"async_save": True}), tmp_path / "async")
    for step in (2, 4):
        expected, actual = (
            torch.load(tmp_path / run / "checkpoints" / f"step_{step:08d}" / STATE_FILE, weights_only=True)
            for run in ("sync", "async")
        )
        for key, state in expected["optimizer"]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, actual["optimizer"]["state"][key][name]), f"step {step}: {key}.{name}"


def test_the_optimizer_step_waits_for_a_pending_snapshot_and_the_wait_is_counted(tmp_path, monkeypatch):
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    writer, snapshot = CheckpointWriter(background=True), {"weight": weight.detach()}
    writer.guard(optimizer)
    _slow_staging(monkeypatch)

    writer.submit(lambda: tmp_path, snapshot=snapshot, live={weight.untyped_storage().data_ptr()})
    weight.grad = torch.ones(4)
    optimizer.step()
    writer.wait()
    assert torch.equal(snapshot["weight"], torch.ones(4))  # the copy holds the value before the update
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
