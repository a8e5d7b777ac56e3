"""FSDP2 on two CPU processes (gloo) with the memory features: bf16 mixed precision (MixedPrecisionPolicy: weights
gathered in bf16, fp32 gradients, an fp32 value head) trains within a stated tolerance of fp32, on critic-wmtp so
the value head and Stage 1 run sharded too; rho1's sharded reference with sequential heads and checkpointed blocks
trains as one plain process does.
"""

from __future__ import annotations

import json

import pytest
from support.recipes import TINY_OVERRIDES
from support.torchrun import torchrun_worker
from support.training import plan_and_train

from wmtp_core.recipes import load_recipe
from wmtp_core.training.worker import METRICS_PREFIX

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # each torchrun job takes 10-20 s here
STEPS = 8
RUN = [
    "train.algorithm=critic-wmtp",
    "critic.pretrain_steps=2",
    f"train.max_steps={STEPS}",
    f"train.save_every={STEPS}",
    "train.eval_every=100",
    "train.log_every=1",
    "devices.strategy=fsdp",
    "devices.nproc_per_node=2",
    "devices.timeout_s=60",
]
BF16_TOLERANCE = 0.005
"""Largest relative difference of a step's loss, bf16 mixed precision against fp32 (measured here: at most 0.03%)."""


def torchrun_losses(tmp_path, *extra: str, steps: int = STEPS) -> tuple[dict[int, float], str]:
    """Train on 2 processes; the loss per step and what rank 0 logged."""
    recipe = load_recipe(None, [*TINY_OVERRIDES, *RUN, *extra])
    out, outcome = torchrun_worker(recipe, tmp_path, timeout=180)
    assert outcome["ok"] and outcome["result"]["steps"] == steps
    reports = [
        json.loads(line.removeprefix(METRICS_PREFIX))
        for line in out.stdout.splitlines()
        if line.startswith(METRICS_PREFIX)
    ]
    return {r["step"]: r["metrics"]["loss"] for r in reports if "loss" in r["metrics"]}, out.stdout


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory) -> dict[int, float]:
    losses, log = torchrun_losses(tmp_path_factory.mktemp("fp32"))
    assert "FSDP2 mixed precision off" in log
    return losses


def test_bf16_mixed_precision_trains_within_tolerance_of_fp32(fp32_losses, tmp_path):
    losses, log = torchrun_losses(tmp_path, "devices.precision=bf16")
    assert "FSDP2 mixed precision torch.bfloat16" in log
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    assert losses == pytest.approx(fp32_losses, rel=BF16_TOLERANCE)


def test_rho1_with_its_reference_sharded_and_sequential_checkpointed_heads_trains_as_one_process_does(tmp_path):
    """Each rank gets the reference CE of its own batch from the sharded reference, and the heads one at a time with
    checkpointed blocks give the plain computation's gradients: the 2-process job's losses are those of one plain
    process accumulating the same two micro-batches."""
    reference_recipe = load_recipe(None, [*TINY_OVERRIDES, "train.max_steps=2", "tracking.enabled=false"])
    reference = plan_and_train(reference_recipe, tmp_path / "reference").latest_checkpoint
    rho1 = ["train.algorithm=rho1-wmtp", f"rho1.reference_checkpoint={reference}", "train.max_steps=4"]
    features = ["loss.sequential_heads=on", "train.activation_checkpointing=blocks"]
    losses, log = torchrun_losses(tmp_path / "two", *rho1, *features, steps=4)
    assert "rho1 reference sharded over 2 processes" in log
    assert "heads one at a time; activation checkpointing blocks (2 blocks)" in log  # the trunk's; heads recompute
    one = load_recipe(None, [*TINY_OVERRIDES, *RUN, *rho1, "devices.strategy=single", "devices.nproc_per_node=1"])
    one = one.model_copy(update={"train": one.train.model_copy(update={"grad_accumulation_steps": 2})})
    single = {}
    plan_and_train(
        one,
        tmp_path / "one",
        on_metrics=lambda step, m: single.update({step: m["loss"]} if "loss" in m else {}),
    )
    assert losses == pytest.approx(single, rel=1e-5)
