"""Per-(token, head) weights of the WMTP algorithms, vectorised and detached (constants for the CE gradient).

Shapes: B batch, T time, K heads (head k at t predicts token t+k+1). mask_BTK is 1.0 where a head has a target;
valid_BT is 1.0 on real tokens (padding only at the end of a row). Every weight is finite, non-negative and 0
where masked.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from wmtp_core.data import IGNORE_INDEX


@torch.no_grad()
def normalize_weights(
    scores_BTK: torch.Tensor,
    mask_BTK: torch.Tensor,
    *,
    mode: Literal["head_softmax", "token_mean1_clip"],
    temperature: float,
    max_weight: float,
) -> torch.Tensor:
    """head_softmax: softmax over each position's valid heads; token_mean1_clip: exp(s/T) at mean 1 over valid pairs, clipped."""
    if mode == "head_softmax":
        logits_BTK = (scores_BTK.float() / temperature).masked_fill(mask_BTK == 0, float("-inf"))
        has_head_BT1 = mask_BTK.sum(-1, keepdim=True) > 0
        # Rows with no valid head would softmax to NaN; give them a finite dummy row and zero it after.
        logits_BTK = torch.where(has_head_BT1, logits_BTK, torch.zeros_like(logits_BTK))
        return torch.softmax(logits_BTK, dim=-1) * mask_BTK
    return _mean_one(scores_BTK, mask_BTK, temperature).clamp(max=max_weight)


def _mean_one(scores_BTK: torch.Tensor, mask_BTK: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(scores / T) over valid pairs, divided by its mean there (so the mean is exactly 1); 0 where masked."""
    valid = mask_BTK > 0
    if not valid.any():
        return torch.zeros_like(scores_BTK, dtype=torch.float32)
    scaled_BTK = scores_BTK.detach().float() / temperature
    shift = scaled_BTK[valid].max()  # a global shift keeps exp finite and cancels in the ratio
    raw_BTK = torch.exp(scaled_BTK - shift) * mask_BTK
    return raw_BTK / (raw_BTK.sum() / mask_BTK.sum())


@torch.no_grad()
def reference_next_token_ce(ref_logits_BTV: torch.Tensor, labels_BTK: torch.Tensor) -> torch.Tensor:
    """r[b, t] = CE(ref_logits[b, t], labels[b, t, 0]): the reference's loss on token t+1; 0 where ignored."""
    B, T, V = ref_logits_BTV.shape
    ce = F.cross_entropy(ref_logits_BTV.float().reshape(B * T, V), labels_BTK[..., 0].reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(B, T)


@torch.no_grad()
def rho1_excess(ce_BTK: torch.Tensor, ref_ce_BT: torch.Tensor, mask_BTK: torch.Tensor, *, min_ce_diff: float) -> torch.Tensor:
    """e = |CE_head_k(t) - CE_ref(t+k)| (both predict token t+k+1), 0 below min_ce_diff; all-zero rows become 1."""
    B, T, K = ce_BTK.shape
    ref_pos_TK = torch.arange(T, device=ce_BTK.device)[:, None] + torch.arange(K, device=ce_BTK.device)[None, :]
    aligned_BTK = ref_ce_BT[:, ref_pos_TK.clamp(max=T - 1)] * (ref_pos_TK < T)
    excess_BTK = (ce_BTK.detach().float() - aligned_BTK).abs() * mask_BTK
    excess_BTK = excess_BTK * (excess_BTK >= min_ce_diff)
    # A sequence where nothing clears the threshold would stop training entirely; keep it with uniform scores.
    empty_B11 = (excess_BTK.sum(dim=(1, 2)) == 0)[:, None, None]
    return torch.where(empty_B11, mask_BTK.float(), excess_BTK)


@torch.no_grad()
def token_skip_selection(excess_BTK: torch.Tensor, mask_BTK: torch.Tensor, *, percentile: float) -> torch.Tensor:
    """1.0 where valid and e >= the sequence's `percentile` quantile of e over its valid entries only."""
    B = excess_BTK.shape[0]
    masked_BN = excess_BTK.float().masked_fill(mask_BTK == 0, float("nan")).reshape(B, -1)
    has_valid_B = (mask_BTK.reshape(B, -1) > 0).any(dim=1)
    masked_BN = torch.where(has_valid_B[:, None], masked_BN, torch.zeros_like(masked_BN))
    threshold_B11 = torch.nanquantile(masked_BN, percentile, dim=1)[:, None, None]
    return ((excess_BTK >= threshold_B11) & (mask_BTK > 0)).float()


def discounted_cumsum(x_BT: torch.Tensor, *, factor: float) -> torch.Tensor:
    """y[t] = sum_{j >= t} factor^(j - t) * x[j], as one matmul with a T x T discount matrix (no loop over t)."""
    T = x_BT.shape[-1]
    steps_TT = torch.arange(T, device=x_BT.device)[None, :] - torch.arange(T, device=x_BT.device)[:, None]
    discount_TT = torch.where(steps_TT >= 0, torch.tensor(factor, dtype=torch.float64) ** steps_TT.clamp(min=0).double(),
                              torch.zeros((), dtype=torch.float64)).to(x_BT.dtype)
    return x_BT @ discount_TT.T


def spread_rewards(rewards_B: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """r[b, t] = R_b / L_b on the L_b real tokens of row b (not the padded length), 0 on padding."""
    lengths_B1 = valid_BT.sum(dim=1, keepdim=True).clamp_min(1.0)
    return rewards_B.float()[:, None] / lengths_B1 * valid_BT


@torch.no_grad()
def value_pretrain_targets(rewards_BT: torch.Tensor, valid_BT: torch.Tensor, *, gamma: float, gae_lambda: float) -> torch.Tensor:
    """Stage 1 targets: GAE with zero value estimates, i.e. the (gamma*lambda)-discounted reward-to-go."""
    return discounted_cumsum(rewards_BT.float() * valid_BT, factor=gamma * gae_lambda) * valid_BT


@torch.no_grad()
def gae_returns(
    values_BT: torch.Tensor, rewards_BT: torch.Tensor, valid_BT: torch.Tensor, *, gamma: float, gae_lambda: float
) -> torch.Tensor:
    """G = V + A with A the GAE of delta_t = r_t + gamma V_(t+1) - V_t; V past a sequence's end is 0."""
    values_BT = values_BT.detach().float() * valid_BT
    next_values_BT = F.pad(values_BT[:, 1:], (0, 1))  # already 0 on padding, so 0 past each sequence's end
    deltas_BT = (rewards_BT.float() + gamma * next_values_BT - values_BT) * valid_BT
    return (values_BT + discounted_cumsum(deltas_BT, factor=gamma * gae_lambda)) * valid_BT


@torch.no_grad()
def critic_head_scores(values_BT: torch.Tensor, valid_BT: torch.Tensor, *, discount_lambda: float, horizon: int) -> torch.Tensor:
    """u[b, t, k] = delta[b, t+k+1] with delta_t = V_t - discount_lambda * V_(t-1) (V_(-1) = 0); 0 past the end."""
    values_BT = values_BT.detach().float() * valid_BT
    deltas_BT = values_BT - discount_lambda * F.pad(values_BT[:, :-1], (1, 0))
    T = values_BT.shape[1]
    pos_TK = torch.arange(T, device=values_BT.device)[:, None] + torch.arange(1, horizon + 1, device=values_BT.device)[None, :]
    return deltas_BT[:, pos_TK.clamp(max=T - 1)] * (pos_TK < T)


@torch.no_grad()
def weight_stats(weights_BTK: torch.Tensor, mask_BTK: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, max, min over valid entries and the mean per-position entropy of the head distribution (0-dim tensors)."""
    valid = mask_BTK > 0
    w_BTK = weights_BTK.float() * mask_BTK
    if not valid.any():
        zero = torch.zeros((), device=weights_BTK.device)
        return {"weight_mean": zero, "weight_max": zero, "weight_min": zero, "weight_entropy": zero}
    p_BTK = w_BTK / w_BTK.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy_BT = -(p_BTK * torch.log(p_BTK.clamp_min(1e-12))).sum(-1)
    has_head_BT = valid.any(-1)
    return {
        "weight_mean": w_BTK[valid].mean(),
        "weight_max": w_BTK[valid].max(),
        "weight_min": w_BTK[valid].min(),
        "weight_entropy": entropy_BT[has_head_BT].mean(),
    }
