"""critic-wmtp Stage 1: pretrain the value head against GAE-spread sequence rewards with the trunk frozen.

A step is one global batch, as in training: grad_accumulation_steps micro-batches on each process, the value head's
gradients averaged over processes. It stops at critic.pretrain_steps or when the value loss (the mean over
processes, so every rank stops at the same step) has not improved by pretrain_min_delta for pretrain_patience steps
(the whole stage stops, unlike the original's inner-loop-only break).
"""

from __future__ import annotations

import logging

import torch

from wmtp_core.algorithms.objective import MicroBatch
from wmtp_core.algorithms.weights import spread_rewards, value_pretrain_targets
from wmtp_core.config import CriticConfig
from wmtp_core.runtime.devices import DevicePlan, autocast_context
from wmtp_core.runtime.distributed import all_reduce_mean, gradients_averaged_by_hand, unwrap
from wmtp_core.training.parts import RunParts, TrainState, batch_stream

log = logging.getLogger(__name__)


def pretrain_value_head(
    parts: RunParts, *, critic: CriticConfig, grad_accumulation_steps: int, plan: DevicePlan
) -> dict[str, float]:
    """Train only the model's value head; returns the steps run and the last value loss.
    grad_accumulation_steps: train.grad_accumulation_steps, micro-batches per step as in training."""
    # evaluate() resharded FSDP2's root after the initial eval, so these are the sharded parameters FSDP updates.
    head_params = list(unwrap(parts.model).value_head.parameters())
    optimizer = torch.optim.AdamW(head_params, lr=critic.pretrain_lr)
    accumulation = grad_accumulation_steps
    # Its own data position, so Stage 2 sees the same batch order as a run that skipped Stage 1.
    batches = batch_stream(parts, TrainState())
    best, stale, loss_value, steps = float("inf"), 0, float("nan"), 0
    try:
        for steps in range(1, critic.pretrain_steps + 1):
            step_loss = torch.zeros((), device=plan.device)
            with gradients_averaged_by_hand(parts.model, head_params, parts.ctx):
                for _ in range(accumulation):
                    loss = value_pretrain_loss(parts, next(batches), critic=critic, plan=plan) / accumulation
                    loss.backward()
                    step_loss += loss.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = all_reduce_mean(step_loss, parts.ctx).item()
            best, stale = (loss_value, 0) if loss_value < best - critic.pretrain_min_delta else (best, stale + 1)
            if stale >= critic.pretrain_patience:
                log.info("critic Stage 1: value loss flat for %d steps, stopping at step %d", stale, steps)
                break
    finally:
        batches.close()
    log.info("critic Stage 1 done: %d steps, value loss %.5f", steps, loss_value)
    return {"value_pretrain_steps": float(steps), "value_pretrain_loss": loss_value}


def value_pretrain_loss(parts: RunParts, batch: dict, *, critic: CriticConfig, plan: DevicePlan) -> torch.Tensor:
    """MSE between V(h_t) and the discounted spread reward, over real tokens; the trunk gets no gradient."""
    mb = MicroBatch.from_batch(batch, device=plan.device, pad_id=parts.pad_id)
    with autocast_context(plan):
        values_BT = parts.model(mb.tokens_BT, values_only=True)  # through DDP/FSDP's forward, which they hook
    rewards_BT = spread_rewards(mb.rewards_B, mb.valid_BT)
    targets_BT = value_pretrain_targets(rewards_BT, mb.valid_BT, gamma=critic.gamma, gae_lambda=critic.gae_lambda)
    return ((values_BT - targets_BT) ** 2 * mb.valid_BT).sum() / mb.valid_BT.sum().clamp_min(1.0)
