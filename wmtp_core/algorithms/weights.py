"""Per-(token, head) weights of the WMTP algorithms, vectorised and detached (constants for the CE gradient).

Shapes: B batch, T time, K heads (head k at t predicts token t+k+1). mask_BTK is 1.0 where a head has a target;
valid_BT is 1.0 on real tokens (padding only at the end of a row). Every weight is finite, non-negative and 0
where masked. No losses here (wmtp_core.algorithms.losses) and no model calls (wmtp_core.algorithms.objective).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from wmtp_core.data.sequences import IGNORE_INDEX


@torch.no_grad()
def normalize_weights(
    scores_BTK: torch.Tensor,
    mask_BTK: torch.Tensor,
    *,
    mode: Literal["head_softmax", "token_mean1_clip"],
    temperature: float,
    max_weight: float,
) -> torch.Tensor:
    """head_softmax: w = softmax_k(s/T) over valid heads; token_mean1_clip: w = min(exp(s/T) / mean_valid exp(s/T),
    max_weight)."""
    match mode:
        case "head_softmax":
            return _head_softmax(scores_BTK, mask_BTK, temperature)
        case "token_mean1_clip":
            return _mean_one(scores_BTK, mask_BTK, temperature).clamp(max=max_weight)
    raise ValueError(f"unknown weight normalisation mode {mode!r}; use 'head_softmax' or 'token_mean1_clip'")


def _head_softmax(scores_BTK: torch.Tensor, mask_BTK: torch.Tensor, temperature: float) -> torch.Tensor:
    valid_BTK = mask_BTK > 0
    logits_BTK = (scores_BTK.detach().float() / temperature).masked_fill(~valid_BTK, float("-inf"))
    # A position with no valid head would softmax an all -inf row to NaN; give it zeros and mask it after.
    logits_BTK = logits_BTK.masked_fill(~valid_BTK.any(-1, keepdim=True), 0.0)
    return torch.softmax(logits_BTK, dim=-1).masked_fill(~valid_BTK, 0.0)


def _mean_one(scores_BTK: torch.Tensor, mask_BTK: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(s/T) on valid pairs divided by its mean over them (so that mean is exactly 1), before clipping; 0 where
    masked."""
    valid_BTK = mask_BTK > 0
    if not valid_BTK.any():
        return torch.zeros_like(scores_BTK, dtype=torch.float32)
    scaled_BTK = scores_BTK.detach().float() / temperature
    shift = scaled_BTK[valid_BTK].max()  # a global shift keeps exp finite and cancels in the ratio
    # Masked scores are arbitrary and may exceed the shift: fill before exp so inf * 0 never makes a NaN.
    raw_BTK = torch.exp((scaled_BTK - shift).masked_fill(~valid_BTK, float("-inf")))
    return raw_BTK / raw_BTK[valid_BTK].mean()


@torch.no_grad()
def reference_next_token_ce(ref_logits_BTV: torch.Tensor, labels_BTK: torch.Tensor) -> torch.Tensor:
    """r[b, t] = CE(ref_logits[b, t], labels[b, t, 0]) in fp32: the reference's loss on token t+1; 0 where ignored."""
    B, T, V = ref_logits_BTV.shape
    ce = F.cross_entropy(
        ref_logits_BTV.float().reshape(B * T, V),
        labels_BTK[..., 0].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return ce.view(B, T)


@torch.no_grad()
def rho1_excess(
    ce_BTK: torch.Tensor, ref_ce_BT: torch.Tensor, mask_BTK: torch.Tensor, *, min_ce_diff: float
) -> torch.Tensor:
    """e = |ce[t, k] - ref_ce[t+k]| * 1[e >= min_ce_diff] (both predict token t+k+1); a row with no nonzero e gets e =
    1."""
    valid_BTK = mask_BTK > 0
    excess_BTK = (ce_BTK.detach().float() - _aligned_reference_ce(ref_ce_BT, num_heads=ce_BTK.shape[-1])).abs()
    excess_BTK = torch.where(valid_BTK & (excess_BTK >= min_ce_diff), excess_BTK, torch.zeros_like(excess_BTK))
    # A sequence where nothing clears the threshold would stop training entirely; keep it with uniform scores.
    empty_B11 = (excess_BTK.sum(dim=(1, 2)) == 0)[:, None, None]
    return torch.where(empty_B11, valid_BTK.float(), excess_BTK)


def _aligned_reference_ce(ref_ce_BT: torch.Tensor, *, num_heads: int) -> torch.Tensor:
    """R[b, t, k] = ref_ce[b, t+k] (the reference's CE on token t+k+1, like head k at t); 0 where t+k >= T."""
    T = ref_ce_BT.shape[1]
    ref_pos_TK = (
        torch.arange(T, device=ref_ce_BT.device)[:, None] + torch.arange(num_heads, device=ref_ce_BT.device)[None, :]
    )
    gathered_BTK = ref_ce_BT.detach().float()[:, ref_pos_TK.clamp(max=T - 1)]
    return torch.where(ref_pos_TK < T, gathered_BTK, torch.zeros_like(gathered_BTK))


@torch.no_grad()
def token_skip_selection(excess_BTK: torch.Tensor, mask_BTK: torch.Tensor, *, percentile: float) -> torch.Tensor:
    """s = 1[valid and e >= tau_b], tau_b = quantile(e[b] over its valid entries only, percentile)."""
    B = excess_BTK.shape[0]
    valid_BN = (mask_BTK > 0).reshape(B, -1)
    # NaN marks padding for nanquantile; an all-NaN row gives tau = NaN, and e >= NaN is False, so it selects nothing.
    excess_BN = excess_BTK.detach().float().reshape(B, -1).masked_fill(~valid_BN, float("nan"))
    threshold_B1 = torch.nanquantile(excess_BN, percentile, dim=1, keepdim=True)
    return ((excess_BN >= threshold_B1) & valid_BN).float().view_as(excess_BTK)


def discounted_cumsum(x_BT: torch.Tensor, *, factor: float) -> torch.Tensor:
    """y[t] = sum_{j >= t} factor^(j - t) * x[j], as one matmul with a T x T discount matrix (no loop over t)."""
    T = x_BT.shape[-1]
    dtype = torch.promote_types(x_BT.dtype, torch.float32)
    steps_TT = torch.arange(T, device=x_BT.device)[None, :] - torch.arange(T, device=x_BT.device)[:, None]
    # Row t holds factor^(j - t) for j >= t; pow(0, 0) = 1 keeps factor = 0 exact (y = x).
    powers_TT = torch.pow(factor, steps_TT.clamp(min=0).to(dtype))
    discount_TT = torch.where(steps_TT >= 0, powers_TT, torch.zeros_like(powers_TT))
    return x_BT.to(dtype) @ discount_TT.T


def spread_rewards(rewards_B: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """r[b, t] = R_b / L_b on the L_b real tokens of row b (not the padded length), 0 on padding."""
    lengths_B1 = valid_BT.float().sum(dim=1, keepdim=True).clamp_min(1.0)
    return rewards_B.detach().float()[:, None] / lengths_B1 * valid_BT.float()


@torch.no_grad()
def value_pretrain_targets(
    rewards_BT: torch.Tensor, valid_BT: torch.Tensor, *, gamma: float, gae_lambda: float
) -> torch.Tensor:
    """Stage 1 targets: GAE with zero values, i.e. discounted_cumsum(r, gamma * lambda), 0 on padding."""
    valid = valid_BT > 0
    rewards_BT = torch.where(valid, rewards_BT.float(), torch.zeros_like(rewards_BT, dtype=torch.float32))
    return discounted_cumsum(rewards_BT, factor=gamma * gae_lambda) * valid


@torch.no_grad()
def gae_returns(
    values_BT: torch.Tensor, rewards_BT: torch.Tensor, valid_BT: torch.Tensor, *, gamma: float, gae_lambda: float
) -> torch.Tensor:
    """G = V + A, A = discounted_cumsum(r_t + gamma V_(t+1) - V_t, gamma * lambda); V past a sequence's end is 0."""
    valid = valid_BT > 0
    values_BT = torch.where(valid, values_BT.detach().float(), torch.zeros_like(values_BT, dtype=torch.float32))
    next_values_BT = F.pad(values_BT[:, 1:], (0, 1))  # already 0 on padding, so 0 past each sequence's end
    deltas_BT = torch.where(valid, rewards_BT.float() + gamma * next_values_BT - values_BT, torch.zeros_like(values_BT))
    return (values_BT + discounted_cumsum(deltas_BT, factor=gamma * gae_lambda)) * valid


@torch.no_grad()
def critic_head_scores(
    values_BT: torch.Tensor, valid_BT: torch.Tensor, *, discount_lambda: float, horizon: int
) -> torch.Tensor:
    """u[b, t, k] = delta[b, t+k+1] with delta_t = V_t - discount_lambda * V_(t-1) (V_(-1) = 0); 0 where t+k+1 >= T."""
    valid = valid_BT > 0
    values_BT = torch.where(valid, values_BT.detach().float(), torch.zeros_like(values_BT, dtype=torch.float32))
    deltas_BT = values_BT - discount_lambda * F.pad(values_BT[:, :-1], (1, 0))
    T = values_BT.shape[1]
    pos_TK = (
        torch.arange(T, device=values_BT.device)[:, None]
        + torch.arange(1, horizon + 1, device=values_BT.device)[None, :]
    )
    gathered_BTK = deltas_BT[:, pos_TK.clamp(max=T - 1)]
    return torch.where(pos_TK < T, gathered_BTK, torch.zeros_like(gathered_BTK))


@torch.no_grad()
def weight_stats(weights_BTK: torch.Tensor, mask_BTK: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean/max/min of w over valid entries, mean over positions of -sum_k p log p, p = w / sum_k w (0-dim tensors)."""
    valid_BTK = mask_BTK > 0
    if not valid_BTK.any():
        zero = torch.zeros((), device=weights_BTK.device)
        return {
            "weight_mean": zero,
            "weight_max": zero.clone(),
            "weight_min": zero.clone(),
            "weight_entropy": zero.clone(),
        }
    w_BTK = torch.where(valid_BTK, weights_BTK.detach().float(), torch.zeros_like(weights_BTK, dtype=torch.float32))
    valid_w = w_BTK[valid_BTK]
    return {
        "weight_mean": valid_w.mean(),
        "weight_max": valid_w.max(),
        "weight_min": valid_w.min(),
        "weight_entropy": _head_entropy(w_BTK)[valid_BTK.any(-1)].mean(),
    }


def _head_entropy(w_BTK: torch.Tensor) -> torch.Tensor:
    total_BT1 = w_BTK.sum(-1, keepdim=True)
    p_BTK = torch.where(
        total_BT1 > 0, w_BTK / total_BT1.clamp_min(torch.finfo(w_BTK.dtype).tiny), torch.zeros_like(w_BTK)
    )
    # 0 log 0 = 0: the log of a zero p is replaced before the product so it never meets -inf.
    return -(p_BTK * torch.log(torch.where(p_BTK > 0, p_BTK, torch.ones_like(p_BTK)))).sum(-1)
