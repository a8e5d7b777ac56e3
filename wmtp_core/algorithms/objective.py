"""One micro-batch's loss for each WMTP algorithm: baseline-mtp (uniform), rho1-wmtp (excess loss against a
reference model) and critic-wmtp (value-head TD weights plus an auxiliary value loss).

Weights are constants for the gradient of the weighted CE (wmtp_core.algorithms.weights detaches them).
Shapes: B batch, T time, D width, K heads, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from wmtp_core.algorithms.losses import (
    head_cross_entropy,
    mean_ce_per_head,
    one_head_cross_entropy,
    token_weighted_loss,
    valid_mask,
    weighted_mtp_loss,
)
from wmtp_core.algorithms.weights import (
    critic_head_scores,
    gae_returns,
    normalize_weights,
    reference_next_token_ce,
    rho1_excess,
    spread_rewards,
    token_skip_selection,
    weight_stats,
)
from wmtp_core.config import CriticConfig, LossConfig, Recipe, Rho1Config
from wmtp_core.runtime.devices import DevicePlan, autocast_context
from wmtp_core.runtime.distributed import reshard_after_forward_only

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MicroBatch:
    tokens_BT: torch.Tensor
    labels_BTK: torch.Tensor
    rewards_B: torch.Tensor
    valid_BT: torch.Tensor  # 1.0 on real tokens, 0.0 on padding
    mask_BTK: torch.Tensor  # 1.0 where a head has a target

    @staticmethod
    def from_batch(batch: dict[str, torch.Tensor], *, device: str, pad_id: int) -> MicroBatch:
        tokens_BT = batch["tokens"].to(device, non_blocking=True)
        labels_BTK = batch["labels"].to(device, non_blocking=True)
        return MicroBatch(
            tokens_BT=tokens_BT,
            labels_BTK=labels_BTK,
            rewards_B=batch["rewards"].to(device, non_blocking=True),
            valid_BT=(tokens_BT != pad_id).float(),
            mask_BTK=valid_mask(labels_BTK),
        )


def sequential_heads(loss: LossConfig, plan: DevicePlan, *, horizon: int) -> bool:
    """Whether the heads run one at a time (loss.sequential_heads): auto is on for a model with several heads
    (horizon: model.horizon) on an accelerator, whose memory is what limits batch and length; on a CPU the extra
    forward of the heads costs time that memory rarely needs."""
    match loss.sequential_heads:
        case "on" | "off" as setting:
            return setting == "on"
    return horizon > 1 and plan.device != "cpu"


def head_losses(
    model: torch.nn.Module, tokens_BT: torch.Tensor, labels_BTK: torch.Tensor, *, sequential: bool, values: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ce_BTK, values_BT or None) through the model's forward (which DDP and FSDP hook): all heads' logits at once,
    or with sequential one head at a time, its logits recomputed in backward (wmtp_core.models.heads)."""
    head_loss = partial(one_head_cross_entropy, labels_BTK=labels_BTK) if sequential else None
    outputs = model(tokens_BT, return_values=values, head_loss=head_loss)
    first, values_BT = outputs if values else (outputs, None)
    return (first if sequential else head_cross_entropy(first, labels_BTK)), values_BT


@dataclass(frozen=True)
class Objective:
    """What one micro-batch's loss depends on: the recipe's algorithm, its loss, rho1 and critic sections, and the
    horizon (with loss, whether the heads run one at a time). Made once per run (Objective.of), not per step."""

    algorithm: str
    loss: LossConfig
    rho1: Rho1Config
    critic: CriticConfig
    horizon: int

    @classmethod
    def of(cls, recipe: Recipe) -> Objective:
        return cls(recipe.train.algorithm, recipe.loss, recipe.rho1, recipe.critic, recipe.model.horizon)


def algorithm_loss(
    model: torch.nn.Module,
    mb: MicroBatch,
    objective: Objective,
    *,
    plan: DevicePlan,
    reference: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The scaled weighted MTP loss (+ the critic's value loss) and its metrics as 0-dim tensors.

    rho1 and critic settings are read by their algorithm only. The weights are computed from every head's CE (and
    the values) before any gradient flows; with sequential heads that CE comes from a forward that keeps no logits,
    and backward recomputes one head at a time."""
    algorithm, loss, rho1, critic = objective.algorithm, objective.loss, objective.rho1, objective.critic
    is_critic = algorithm == "critic-wmtp"
    sequential = sequential_heads(loss, plan, horizon=objective.horizon)
    with autocast_context(plan):
        ce_BTK, values_BT = head_losses(model, mb.tokens_BT, mb.labels_BTK, sequential=sequential, values=is_critic)
    metrics: Metrics = {}
    extra_loss = torch.zeros((), device=ce_BTK.device)
    match algorithm:
        case "baseline-mtp":
            weights_BTK = _normalized(torch.zeros_like(ce_BTK), mb, loss)
        case "rho1-wmtp":
            weights_BTK, metrics = rho1_weights(ce_BTK, mb, rho1=rho1, loss=loss, plan=plan, reference=reference)
        case "critic-wmtp":
            weights_BTK, extra_loss, metrics = critic_weights(values_BT, mb, critic=critic, loss=loss)
    token_skip = algorithm == "rho1-wmtp" and rho1.selection_mode == "token_skip"
    wmtp_loss = _combine(ce_BTK, weights_BTK, mb, loss=loss, token_skip=token_skip)
    metrics.update(weight_stats(weights_BTK, mb.mask_BTK), wmtp_loss=wmtp_loss.detach())
    head_ce_K = mean_ce_per_head(ce_BTK.detach(), mb.mask_BTK)
    metrics.update({f"ce_head_{k}": head_ce_K[k] for k in range(head_ce_K.numel())})
    return loss.scale * wmtp_loss + extra_loss, metrics


def rho1_weights(
    ce_BTK: torch.Tensor,
    mb: MicroBatch,
    *,
    rho1: Rho1Config,
    loss: LossConfig,
    plan: DevicePlan,
    reference: torch.nn.Module | None,
) -> tuple[torch.Tensor, Metrics]:
    """Weights from the excess loss |CE_head_k(t) - CE_ref(t+k)| (both predict token t+k+1)."""
    if reference is None:
        raise ValueError("rho1-wmtp needs a reference model; set rho1.reference_checkpoint or leave it null")
    with torch.no_grad(), autocast_context(plan):
        ref_logits_BTV = reference(mb.tokens_BT)[:, :, 0]  # the reference's next-token head
    reshard_after_forward_only(reference)  # a sharded reference has no backward to free its gathered root
    ref_ce_BT = reference_next_token_ce(ref_logits_BTV, mb.labels_BTK)
    excess_BTK = rho1_excess(ce_BTK, ref_ce_BT, mb.mask_BTK, min_ce_diff=rho1.min_ce_diff)
    if rho1.selection_mode == "weighted":
        return _normalized(excess_BTK, mb, loss), {"excess_mean": _masked_mean(excess_BTK, mb.mask_BTK)}
    selected_BTK = token_skip_selection(excess_BTK, mb.mask_BTK, percentile=rho1.skip_threshold_percentile)
    skipped = 1.0 - selected_BTK.sum() / mb.mask_BTK.sum().clamp_min(1.0)
    return selected_BTK, {"skipped_token_ratio": skipped, "excess_mean": _masked_mean(excess_BTK, mb.mask_BTK)}


def critic_weights(
    values_BT: torch.Tensor, mb: MicroBatch, *, critic: CriticConfig, loss: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """TD-difference weights softmaxed over heads, and c_aux * MSE(V, GAE returns) as the auxiliary loss; values_BT
    from the model's value head (forward with return_values)."""
    scores_BTK = critic_head_scores(
        values_BT, mb.valid_BT, discount_lambda=critic.discount_lambda, horizon=mb.labels_BTK.shape[-1]
    )
    rewards_BT = spread_rewards(mb.rewards_B, mb.valid_BT)
    returns_BT = gae_returns(values_BT, rewards_BT, mb.valid_BT, gamma=critic.gamma, gae_lambda=critic.gae_lambda)
    value_loss = _masked_mean((values_BT - returns_BT) ** 2, mb.valid_BT)
    metrics = {"value_loss": value_loss.detach(), "value_mean": _masked_mean(values_BT.detach(), mb.valid_BT)}
    return _normalized(scores_BTK, mb, loss), critic.auxiliary_loss_coef * value_loss, metrics


def _normalized(scores_BTK: torch.Tensor, mb: MicroBatch, loss: LossConfig) -> torch.Tensor:
    return normalize_weights(
        scores_BTK, mb.mask_BTK, mode=loss.weight_norm, temperature=loss.weight_temperature, max_weight=loss.max_weight
    )


def _combine(
    ce_BTK: torch.Tensor, weights_BTK: torch.Tensor, mb: MicroBatch, *, loss: LossConfig, token_skip: bool
) -> torch.Tensor:
    # token_mean1_clip weights move mass between tokens, so they need a loss that does not renormalise per token;
    # token_skip's 0/1 selection keeps the original per-token average over the selected heads.
    if loss.weight_norm == "token_mean1_clip" and not token_skip:
        return token_weighted_loss(ce_BTK, weights_BTK, mb.mask_BTK)
    return weighted_mtp_loss(ce_BTK, weights_BTK, mb.mask_BTK)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)
