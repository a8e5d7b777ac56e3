"""The training loop: learning, exact resume, skipped non-finite updates, metrics reported through the callback."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from support.recipes import with_sections
from support.training import device_plan, plan_and_train

from wmtp_core.checkpoint.manifest import latest_valid_checkpoint, list_checkpoints
from wmtp_core.checkpoint.run_state import progress_counting_every_rank
from wmtp_core.config import PhaseGates
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.training.loop import train_step
from wmtp_core.training.parts import TrainState, batch_stream, build_run_parts


def _plan(recipe):
    return device_plan(recipe, probe_environment())


def _train(recipe, run_dir, **kwargs):
    return plan_and_train(recipe, run_dir, **kwargs)


def test_eval_loss_falls_on_the_builtin_data(tiny_recipe, tmp_path):
    recipe = with_sections(tiny_recipe, train={"max_steps": 40, "warmup_steps": 4, "eval_every": 40, "save_every": 40})
    result = _train(recipe, tmp_path)
    assert result.final_eval_loss < 0.8 * result.initial_eval_loss
    assert result.steps == 40 and result.skipped_steps == 0


def test_checkpoints_are_saved_every_interval_and_pruned(tiny_recipe, tmp_path):
    recipe = with_sections(tiny_recipe, train={"max_steps": 8, "save_every": 2, "keep_last": 2})
    result = _train(recipe, tmp_path)
    assert [info.step for info in list_checkpoints(tmp_path)] == [6, 8]
    assert result.latest_checkpoint == str(tmp_path / "checkpoints" / "step_00000008")


@pytest.mark.parametrize("api", [True, False])
def test_resume_gives_bitwise_identical_weights(tiny_recipe, tmp_path, api):
    recipe = with_sections(
        tiny_recipe, train={"max_steps": 8, "lr_decay_steps": 8, "save_every": 4}, phases={"api": api}
    )
    straight = _train(recipe, tmp_path / "straight")
    first_half = with_sections(recipe, train={"max_steps": 4})
    _train(first_half, tmp_path / "split")
    resumed = _train(recipe, tmp_path / "split", resume_from=latest_valid_checkpoint(tmp_path / "split").path)
    assert resumed.resumed_from_step == 4 and resumed.steps == 8
    expected = load_file(f"{straight.latest_checkpoint}/model.safetensors")
    actual = load_file(f"{resumed.latest_checkpoint}/model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert resumed.initial_eval_loss == straight.initial_eval_loss


def test_resume_continues_the_data_order_across_epochs(tiny_recipe):
    parts = build_run_parts(tiny_recipe, _plan(tiny_recipe))
    per_epoch = len(parts.epoch_batches(0))
    straight = batch_stream(parts, TrainState())
    expected = [next(straight)["tokens"] for _ in range(per_epoch + 3)]
    state = TrainState()
    first = batch_stream(parts, state)
    taken = [next(first)["tokens"] for _ in range(per_epoch - 1)]
    first.close()
    resumed = batch_stream(parts, TrainState(epoch=state.epoch, batch_in_epoch=state.batch_in_epoch))
    taken += [next(resumed)["tokens"] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(expected, taken, strict=True))


def test_non_finite_loss_skips_the_update_and_counts_it(tiny_recipe):
    parts = build_run_parts(tiny_recipe, _plan(tiny_recipe))
    with torch.no_grad():
        parts.model.unembedding.weight[0, 0] = float("nan")
    before = {name: p.detach().clone() for name, p in parts.model.named_parameters()}
    state = TrainState()
    metrics = train_step(parts, batch_stream(parts, state), state=state, recipe=tiny_recipe, plan=_plan(tiny_recipe))
    assert math.isnan(metrics["loss"]) and state.skipped_steps == 1 and state.step == 1
    after = dict(parts.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) or torch.isnan(before[n]).any() for n in before)
    assert not parts.optimizer.state  # AdamW never stepped


def test_a_checkpoint_that_counted_rank_0s_tokens_resumes_with_the_count_of_all_ranks():
    legacy = {
        key: value for key, value in asdict(TrainState(step=4, tokens_seen=3000)).items() if key != "tokens_global"
    }
    assert TrainState(**progress_counting_every_rank(legacy, saved_world_size=2)).tokens_seen == 6000  # x 2 ranks
    current = asdict(TrainState(step=4, tokens_seen=6000))
    assert progress_counting_every_rank(current, saved_world_size=2)["tokens_seen"] == 6000  # already all ranks'


def test_metrics_reach_the_callback(tiny_recipe, tmp_path):
    reports = []
    _train(tiny_recipe, tmp_path, on_metrics=lambda step, metrics: reports.append((step, metrics)))
    train_reports = [m for _, m in reports if "loss" in m]
    assert [s for s, m in reports if "loss" in m] == [1, 2, 3, 4]
    expected = {"loss", "lr", "grad_norm", "tokens_per_s", "skipped_steps", "ce_head_0", "ce_head_1"}
    assert expected <= set(train_reports[0])
    assert [s for s, m in reports if "eval_loss" in m] == [0, 2, 4]


def test_legacy_checkpoint_gate_fails_the_run_at_the_first_save(tiny_recipe, tmp_path):
    from wmtp_core.checkpoint.state_dicts import CheckpointSaveError

    recipe = tiny_recipe.model_copy(update={"phases": PhaseGates(checkpoint=False)})
    with pytest.warns(FutureWarning), pytest.raises(CheckpointSaveError, match=r"KeyError\(None\)"):
        _train(recipe, tmp_path)
    assert list_checkpoints(tmp_path) == []


@pytest.mark.gpu
def test_the_tiny_run_trains_and_resumes_on_cuda(tiny_recipe, tmp_path):
    """The same code path on a GPU: the plan picks CUDA, training stays finite, and a resume continues the run."""
    recipe = with_sections(tiny_recipe, devices={"backend": "cuda"})
    assert _plan(recipe).device.startswith("cuda")
    first = _train(recipe, tmp_path)
    assert first.steps == 4 and math.isfinite(first.final_eval_loss) and first.skipped_steps == 0
    longer = with_sections(recipe, train={"max_steps": 6})
    resumed = _train(longer, tmp_path, resume_from=latest_valid_checkpoint(tmp_path).path)
    assert resumed.resumed_from_step == 4 and resumed.steps == 6
