"""Each algorithm's training step on the tiny model: finite losses, the right parameters learn, Stage 1 is
checkpointed."""

from __future__ import annotations

import pytest
import torch
from support.recipes import with_sections
from support.training import device_plan, plan_and_train

from wmtp_core.algorithms.brief_reference import brief_reference_recipe
from wmtp_core.algorithms.objective import MicroBatch, Objective, algorithm_loss
from wmtp_core.algorithms.reference import load_reference_model
from wmtp_core.checkpoint.manifest import list_checkpoints
from wmtp_core.checkpoint.storage import load_checkpoint
from wmtp_core.run.plan import plan_run, write_plan
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.training.loop import train
from wmtp_core.training.parts import TrainState, batch_stream, build_run_parts


def _plan(recipe):
    return device_plan(recipe, probe_environment())


def _first_micro_batch(parts):
    stream = batch_stream(parts, TrainState())
    batch = next(stream)
    stream.close()
    return MicroBatch.from_batch(batch, device="cpu", pad_id=parts.pad_id)


@pytest.fixture
def rho1_recipe(tiny_recipe):
    return with_sections(tiny_recipe, train={"algorithm": "rho1-wmtp"}, rho1={"reference_steps": 3})


@pytest.mark.parametrize("weight_norm", ["head_softmax", "token_mean1_clip"])
def test_critic_loss_trains_policy_and_value_head(tiny_recipe, weight_norm):
    recipe = with_sections(tiny_recipe, train={"algorithm": "critic-wmtp"}, loss={"weight_norm": weight_norm})
    plan = _plan(recipe)
    parts = build_run_parts(recipe, plan)
    loss, metrics = algorithm_loss(parts.model, _first_micro_batch(parts), Objective.of(recipe), plan=plan)
    loss.backward()
    assert torch.isfinite(loss)
    assert parts.model.value_head.net[0].weight.grad.abs().sum() > 0
    assert parts.model.heads[0].mlp.up.weight.grad.abs().sum() > 0
    assert {"value_loss", "value_mean", "wmtp_loss", "weight_entropy", "ce_head_1"} <= set(metrics)


def test_critic_value_head_has_its_own_learning_rate(tiny_recipe):
    recipe = with_sections(tiny_recipe, train={"algorithm": "critic-wmtp"}, critic={"value_lr": 0.0123})
    parts = build_run_parts(recipe, _plan(recipe))
    value_params = {id(p) for p in parts.model.value_head.parameters()}
    groups = [g for g in parts.optimizer.param_groups if {id(p) for p in g["params"]} == value_params]
    assert len(groups) == 1 and parts.scheduler.base_lrs[parts.optimizer.param_groups.index(groups[0])] == 0.0123


@pytest.mark.parametrize("mode", ["weighted", "token_skip"])
def test_rho1_loss_uses_a_frozen_reference(rho1_recipe, tmp_path, mode):
    recipe = with_sections(rho1_recipe, rho1={"selection_mode": mode})
    plan = _plan(recipe)
    parts = build_run_parts(recipe, plan, reference_checkpoint=_train_brief_reference(recipe, tmp_path))
    loss, metrics = algorithm_loss(
        parts.model, _first_micro_batch(parts), Objective.of(recipe), plan=plan, reference=parts.reference
    )
    loss.backward()
    assert torch.isfinite(loss) and not parts.reference.training
    assert all(p.grad is None and not p.requires_grad for p in parts.reference.parameters())
    assert ("skipped_token_ratio" in metrics) == (mode == "token_skip")
    if mode == "token_skip":
        assert 0.0 < float(metrics["skipped_token_ratio"]) < 1.0


def _train_brief_reference(recipe, run_dir):
    """What the wmtp-train flow's train_reference step does: train the brief reference run the plan plans."""
    planned = plan_run(recipe, directory=run_dir)
    write_plan(planned)
    train(planned.plan.reference_run)
    return planned.plan.reference


def test_a_rho1_run_without_a_named_reference_plans_a_brief_reference_run_first(rho1_recipe, tmp_path):
    run_plan = plan_run(rho1_recipe, directory=tmp_path).plan
    steps = rho1_recipe.rho1.reference_steps
    assert run_plan.reference == tmp_path / "reference" / "checkpoints" / f"step_{steps:08d}"
    assert run_plan.reference_run.run_dir == tmp_path / "reference" and run_plan.reference_run.start.fresh
    assert not run_plan.reference_run.finished


def test_the_brief_reference_is_a_full_format_baseline_run_found_once_finished(rho1_recipe, tmp_path):
    recipe = with_sections(rho1_recipe, checkpoint={"format": "sharded"})
    reference = brief_reference_recipe(recipe)
    assert (reference.train.algorithm, reference.train.max_steps) == ("baseline-mtp", recipe.rho1.reference_steps)
    assert reference.checkpoint.format == "full" and not reference.tracking.enabled
    trained = _train_brief_reference(recipe, tmp_path)
    assert trained == tmp_path / "reference" / "checkpoints" / f"step_{recipe.rho1.reference_steps:08d}"
    assert trained.is_dir()
    replanned = plan_run(recipe, directory=tmp_path).plan
    assert replanned.reference_run.finished and replanned.reference == trained
    assert not load_reference_model(trained, _plan(recipe)).training


def test_critic_stage1_is_saved_and_not_redone_on_resume(tiny_recipe, tmp_path):
    recipe = with_sections(
        tiny_recipe,
        train={"algorithm": "critic-wmtp", "max_steps": 2, "save_every": 10},
        critic={"pretrain_steps": 5, "pretrain_patience": 100},
    )
    reports = []
    plan_and_train(recipe, tmp_path, on_metrics=lambda step, m: reports.append(m))
    assert [m["value_pretrain_steps"] for m in reports if "value_pretrain_steps" in m] == [5.0]
    stage1 = list_checkpoints(tmp_path)[0]
    assert stage1.step == 0
    model_state, train_state, _ = load_checkpoint(stage1.path)
    assert any(name.startswith("value_head.") for name in model_state)
    assert train_state["progress"]["value_head_pretrained"] is True
    reports.clear()
    longer = with_sections(recipe, train={"max_steps": 4})
    result = plan_and_train(
        longer,
        tmp_path,
        resume_from=list_checkpoints(tmp_path)[-1].path,
        on_metrics=lambda step, m: reports.append(m),
    )
    assert result.steps == 4 and not any("value_pretrain_steps" in m for m in reports)


def test_critic_stage1_early_stopping_ends_the_stage(tiny_recipe, tmp_path):
    recipe = with_sections(
        tiny_recipe,
        train={"algorithm": "critic-wmtp", "max_steps": 1},
        critic={"pretrain_steps": 200, "pretrain_patience": 1, "pretrain_min_delta": 1e9},
    )
    reports = []
    plan_and_train(recipe, tmp_path, on_metrics=lambda step, m: reports.append(m))
    # Step 1 sets the best loss; step 2 cannot beat it by 1e9, and patience 1 ends the stage there.
    assert [m["value_pretrain_steps"] for m in reports if "value_pretrain_steps" in m] == [2.0]


@pytest.mark.parametrize(
    "sections",
    [
        {"train": {"algorithm": "rho1-wmtp"}, "rho1": {"reference_steps": 20, "selection_mode": "token_skip"}},
        {
            "train": {"algorithm": "critic-wmtp"},
            "critic": {"pretrain_steps": 20},
            "loss": {"weight_norm": "token_mean1_clip"},
        },
    ],
    ids=["rho1-token-skip", "critic-token-mean1-clip"],
)
def test_algorithm_variant_trains_and_eval_loss_falls(tiny_recipe, tmp_path, sections):
    """The non-default selection and normalisation modes learn too (the defaults run end to end through `wmtp train`
    in tests/integration/test_algorithms_end_to_end.py)."""
    recipe = with_sections(tiny_recipe, **sections)
    recipe = with_sections(recipe, train={**sections["train"], "max_steps": 40, "save_every": 20, "eval_every": 20})
    if recipe.train.algorithm == "rho1-wmtp":
        _train_brief_reference(recipe, tmp_path)
    result = plan_and_train(recipe, tmp_path)
    assert result.steps == 40
    assert result.final_eval_loss < 0.85 * result.initial_eval_loss
