"""The weighted multi-token-prediction cross-entropy.

Shapes: B batch, T time, K horizon (heads), V vocabulary. weighted_mtp_loss averages each position's heads with
per-(token, head) weights and then averages positions; token_weighted_loss averages over all (token, head) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmtp_core.data.sequences import IGNORE_INDEX

_EPS = 1e-8


def head_cross_entropy(logits_BTKV: torch.Tensor, labels_BTK: torch.Tensor) -> torch.Tensor:
    """Per-(token, head) cross-entropy ce_BTK in fp32; 0 where the label is IGNORE_INDEX."""
    B, T, K, V = logits_BTKV.shape
    ce = F.cross_entropy(
        logits_BTKV.float().reshape(B * T * K, V), labels_BTK.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return ce.view(B, T, K)


def one_head_cross_entropy(logits_BTV: torch.Tensor, k: int, *, labels_BTK: torch.Tensor) -> torch.Tensor:
    """Head k's per-token cross-entropy ce_BT in fp32 against labels_BTK[..., k]: the head_loss a model's
    forward(head_loss=partial(one_head_cross_entropy, labels_BTK=...)) computes one head at a time."""
    return head_cross_entropy(logits_BTV.unsqueeze(2), labels_BTK[..., k : k + 1]).squeeze(2)


def weighted_mtp_loss(ce_BTK: torch.Tensor, weights_BTK: torch.Tensor, mask_BTK: torch.Tensor) -> torch.Tensor:
    """mean over valid positions t of sum_k w*m*ce / sum_k w*m; weights are constants for the gradient."""
    wm_BTK = weights_BTK.detach() * mask_BTK
    weight_sum_BT = wm_BTK.sum(dim=-1)
    per_token_BT = (wm_BTK * ce_BTK).sum(dim=-1) / weight_sum_BT.clamp_min(_EPS)
    has_weight_BT = weight_sum_BT > _EPS
    if not has_weight_BT.any():
        # Keep the graph so backward() still works on a batch with no targets; the update is zero.
        return (ce_BTK * 0.0).sum()
    return per_token_BT[has_weight_BT].mean()


def token_weighted_loss(ce_BTK: torch.Tensor, weights_BTK: torch.Tensor, mask_BTK: torch.Tensor) -> torch.Tensor:
    """sum w*m*ce / sum m over valid (token, head) pairs: weights can move mass between tokens (token_mean1_clip)."""
    return (weights_BTK.detach() * mask_BTK * ce_BTK).sum() / mask_BTK.sum().clamp_min(1.0)


def uniform_weights(labels_BTK: torch.Tensor) -> torch.Tensor:
    """baseline-mtp: every (token, head) weighs 1."""
    return torch.ones(labels_BTK.shape, dtype=torch.float32, device=labels_BTK.device)


def valid_mask(labels_BTK: torch.Tensor) -> torch.Tensor:
    """1.0 where a head has a target, 0.0 past the sequence end or on padding."""
    return (labels_BTK != IGNORE_INDEX).float()


def mean_ce_per_head(ce_BTK: torch.Tensor, mask_BTK: torch.Tensor) -> torch.Tensor:
    """Unweighted mean CE of each head over its valid targets, shape (K,)."""
    return (ce_BTK * mask_BTK).sum(dim=(0, 1)) / mask_BTK.sum(dim=(0, 1)).clamp_min(1.0)
