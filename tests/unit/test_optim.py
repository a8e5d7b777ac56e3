"""wmtp_core.training.optim: the schedule in optimizer steps, AdamW's weight-decay groups, fused AdamW on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from wmtp_core.config import TrainConfig
from wmtp_core.models.transformer import MTPTransformer
from wmtp_core.training.optim import build_optimizer, build_scheduler, lr_factor


def _cfg(**fields) -> TrainConfig:
    return TrainConfig(**{"max_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1, **fields})


def test_warmup_ramps_linearly_to_one():
    cfg = _cfg(warmup_steps=4)
    assert [lr_factor(step, cfg) for step in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0, _cfg(warmup_steps=0)) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_reaches_min_lr_ratio_at_max_steps_and_stays(schedule):
    cfg = _cfg(schedule=schedule, min_lr_ratio=0.2)
    assert lr_factor(100, cfg) == pytest.approx(0.2)
    assert lr_factor(500, cfg) == pytest.approx(0.2)
    assert lr_factor(99, cfg) > 0.2


def test_cosine_is_halfway_at_the_middle_of_the_decay():
    cfg = _cfg(schedule="cosine", min_lr_ratio=0.0, warmup_steps=0, max_steps=100)
    assert lr_factor(50, cfg) == pytest.approx(0.5)
    assert lr_factor(25, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_linear_decays_in_a_straight_line():
    cfg = _cfg(schedule="linear", min_lr_ratio=0.0, warmup_steps=0, max_steps=100)
    assert [lr_factor(s, cfg) for s in (0, 25, 50, 75)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_factor_never_increases_after_warmup():
    cfg = _cfg(schedule="cosine")
    factors = [lr_factor(step, cfg) for step in range(10, 120)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_constant_schedule_stays_at_one_after_warmup():
    cfg = _cfg(schedule="constant", warmup_steps=2)
    assert [lr_factor(s, cfg) for s in (0, 1, 2, 50, 100, 1000)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_lr_decay_steps_overrides_max_steps_as_the_decay_horizon():
    cfg = _cfg(schedule="cosine", max_steps=100, lr_decay_steps=40, min_lr_ratio=0.1)
    assert lr_factor(40, cfg) == pytest.approx(0.1)
    assert lr_factor(80, cfg) == pytest.approx(0.1)
    assert lr_factor(25, cfg) == pytest.approx(0.1 + 0.9 * 0.5)


def test_scheduler_applies_lr_factor_to_train_lr():
    cfg = _cfg(lr=0.01, warmup_steps=2)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.01 * lr_factor(s, cfg) for s in range(3)])


@pytest.fixture
def model(tiny_recipe) -> MTPTransformer:
    return MTPTransformer(tiny_recipe.model, vocab_size=64, with_value_head=True)


def _decay_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    group_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    return {name: group_of[id(p)] for name, p in model.named_parameters()}


def test_biases_and_norms_have_no_weight_decay_and_matrices_do(model, tiny_recipe):
    decay = _decay_by_name(model, build_optimizer(model, tiny_recipe.train.model_copy(update={"weight_decay": 0.3})))
    assert len(decay) == len(list(model.parameters()))
    for name, value in decay.items():
        if name.endswith(".bias") or "norm" in name:
            assert value == 0.0, name
    assert decay["trunk.0.attn.qkv.weight"] == 0.3
    assert decay["heads.1.mlp.up.weight"] == 0.3
    assert decay["unembedding.weight"] == 0.3


def test_embeddings_are_not_decayed_as_train_weight_decay_documents(model, tiny_recipe):
    decay = _decay_by_name(model, build_optimizer(model, tiny_recipe.train))
    assert decay["token_embedding.weight"] == 0.0
    assert decay["position_embedding.weight"] == 0.0


def test_value_head_gets_its_own_group_at_value_lr_without_decay(model, tiny_recipe):
    optimizer = build_optimizer(model, tiny_recipe.train, value_lr=1e-4)
    value_params = {id(p) for p in model.value_head.parameters()}
    (group,) = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} == value_params]
    assert group["lr"] == 1e-4 and group["weight_decay"] == 0.0


def test_frozen_parameters_are_left_out_of_the_optimizer(model, tiny_recipe):
    model.token_embedding.weight.requires_grad_(False)
    optimizer = build_optimizer(model, tiny_recipe.train)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.token_embedding.weight) not in in_optimizer
    assert len(in_optimizer) == len(list(model.parameters())) - 1


def test_adamw_is_fused_on_cuda_only(model, tiny_recipe):
    assert build_optimizer(model, tiny_recipe.train).defaults["fused"] is None  # CPU: torch's default, as before
    assert build_optimizer(model, tiny_recipe.train, fused=False).defaults["fused"] is False


@pytest.mark.gpu
def test_adamw_on_cuda_is_fused_and_steps(model, tiny_recipe):
    model = model.cuda()
    optimizer = build_optimizer(model, tiny_recipe.train)
    assert optimizer.defaults["fused"] is True
    model(torch.zeros(2, 8, dtype=torch.long, device="cuda")).float().pow(2).mean().backward()
    optimizer.step()
