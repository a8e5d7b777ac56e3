"""wmtp_core.algorithms.weights: hand-computed examples for each weight rule, and hypothesis properties
over random batches.

Shapes: B batch, T time, K heads; masks are built like the collator (head k at t is valid iff t + k + 1 < length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_core.algorithms.losses import valid_mask
from wmtp_core.algorithms.weights import (
    _aligned_reference_ce,
    _mean_one,
    critic_head_scores,
    discounted_cumsum,
    gae_returns,
    normalize_weights,
    reference_next_token_ce,
    rho1_excess,
    spread_rewards,
    token_skip_selection,
    value_pretrain_targets,
    weight_stats,
)
from wmtp_core.data.sequences import IGNORE_INDEX, mtp_labels

PROPERTY = settings(max_examples=50, deadline=None)


def _batch_masks(lengths: list[int], *, T: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_BTK, valid_BT) for rows of the given real lengths, padded to T, as the collator builds them."""
    lengths_B = torch.tensor(lengths)
    tokens_BT = torch.arange(T).repeat(len(lengths), 1)
    mask_BTK = valid_mask(mtp_labels(tokens_BT, lengths_B, horizon=K))
    valid_BT = (torch.arange(T)[None, :] < lengths_B[:, None]).float()
    return mask_BTK, valid_BT


@dataclass(frozen=True)
class Case:
    lengths: list[int]
    T: int
    K: int
    seed: int
    scale: float

    @property
    def B(self) -> int:
        return len(self.lengths)

    def randn(self, *shape: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(*shape, generator=generator) * self.scale


@st.composite
def cases(draw) -> Case:
    T = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(0, T), min_size=1, max_size=3))
    return Case(
        lengths=lengths,
        T=T,
        K=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.floats(0.01, 10.0)),
    )


def _garbage_where_masked(scores_BTK: torch.Tensor, mask_BTK: torch.Tensor) -> torch.Tensor:
    # Masked scores are arbitrary in practice (e.g. critic scores past the end); large ones must not leak as NaN/inf.
    return torch.where(mask_BTK > 0, scores_BTK, torch.full_like(scores_BTK, 1e4))


# ---------------------------------------------------------------- normalize_weights, hand-computed


def test_head_softmax_renormalises_over_valid_heads_and_zeroes_the_masked_one():
    scores_BTK = torch.tensor([[[0.0, 2 * math.log(3.0), 50.0], [1.0, 1.0, 1.0]]])
    mask_BTK = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]])
    weights = normalize_weights(scores_BTK, mask_BTK, mode="head_softmax", temperature=2.0, max_weight=5.0)
    # position 0: exp(0), exp(ln 3) over the two valid heads -> 1/4, 3/4; position 1: uniform over three heads
    expected = torch.tensor([[[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
    torch.testing.assert_close(weights, expected)
    assert weights[0, 0, 2].item() == 0.0


def test_head_softmax_gives_zeros_at_a_position_with_no_valid_head():
    scores_BTK = torch.tensor([[[3.0, -1.0], [2.0, 7.0]]])
    mask_BTK = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    weights = normalize_weights(scores_BTK, mask_BTK, mode="head_softmax", temperature=1.0, max_weight=5.0)
    torch.testing.assert_close(weights, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))


def test_token_mean1_clip_divides_by_the_batch_mean_then_clips_at_max_weight():
    scores_BTK = torch.tensor([[[0.0, 0.0], [0.0, 2 * math.log(5.0)], [1e4, -1e4]]])
    mask_BTK = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    # exp(s / 2) on valid pairs = 1, 1, 1, 5; their mean is 2 -> 0.5, 0.5, 0.5, 2.5; the clip at 2 bites on the last
    unclipped = _mean_one(scores_BTK, mask_BTK, 2.0)
    torch.testing.assert_close(unclipped, torch.tensor([[[0.5, 0.5], [0.5, 2.5], [0.0, 0.0]]]))
    weights = normalize_weights(scores_BTK, mask_BTK, mode="token_mean1_clip", temperature=2.0, max_weight=2.0)
    torch.testing.assert_close(weights, torch.tensor([[[0.5, 0.5], [0.5, 2.0], [0.0, 0.0]]]))


def test_token_mean1_clip_gives_zeros_when_nothing_is_valid():
    weights = normalize_weights(
        torch.randn(2, 3, 2), torch.zeros(2, 3, 2), mode="token_mean1_clip", temperature=1.0, max_weight=3.0
    )
    assert torch.equal(weights, torch.zeros(2, 3, 2))


def test_normalize_weights_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="weight normalisation mode"):
        normalize_weights(torch.zeros(1, 1, 1), torch.ones(1, 1, 1), mode="softmax", temperature=1.0, max_weight=1.0)


def test_weights_are_detached_from_scores_that_require_grad():
    scores_BTK = torch.randn(1, 3, 2, requires_grad=True)
    mask_BTK = torch.ones(1, 3, 2)
    for mode in ("head_softmax", "token_mean1_clip"):
        assert not normalize_weights(scores_BTK, mask_BTK, mode=mode, temperature=1.0, max_weight=3.0).requires_grad
    assert not rho1_excess(scores_BTK, torch.zeros(1, 3), mask_BTK, min_ce_diff=0.0).requires_grad


# ---------------------------------------------------------------- rho1: reference CE, alignment, excess, token skip


def test_reference_next_token_ce_scores_label_zero_in_fp32_and_is_zero_where_ignored():
    ref_logits_BTV = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]], dtype=torch.bfloat16)
    labels_BTK = torch.tensor([[[1, 0], [0, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]]])
    ref_ce_BT = reference_next_token_ce(ref_logits_BTV, labels_BTK)
    assert ref_ce_BT.dtype == torch.float32
    # t=0: uniform over 2 -> ln 2; t=1: p(token 0) = 3/4 in bf16 logits -> -ln(3/4) up to bf16 rounding of ln 3
    torch.testing.assert_close(ref_ce_BT, torch.tensor([[math.log(2.0), -math.log(0.75), 0.0]]), atol=3e-3, rtol=0)


def test_reference_alignment_pairs_head_k_at_t_with_reference_position_t_plus_k():
    # ref_ce[t] is the reference's CE on token t+1; head k at t predicts token t+k+1, so it pairs with ref_ce[t+k].
    ref_ce_BT = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    aligned_BTK = _aligned_reference_ce(ref_ce_BT, num_heads=2)
    expected = torch.tensor([[[10.0, 20.0], [20.0, 30.0], [30.0, 40.0], [40.0, 0.0]]])  # t+k = 4 is past the end
    torch.testing.assert_close(aligned_BTK, expected)


def test_rho1_excess_uses_the_aligned_reference_on_a_padded_sequence():
    # T=4, K=2, real length 3 (t=3 is padding): valid heads are (0,0), (0,1), (1,0).
    mask_BTK, _ = _batch_masks([3], T=4, K=2)
    assert mask_BTK.tolist() == [[[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]
    ref_ce_BT = torch.tensor([[10.0, 20.0, 0.0, 0.0]])  # reference_next_token_ce is 0 where label 0 is ignored
    ce_BTK = torch.tensor([[[11.0, 25.0], [18.0, 99.0], [7.0, 7.0], [7.0, 7.0]]])
    excess_BTK = rho1_excess(ce_BTK, ref_ce_BT, mask_BTK, min_ce_diff=0.0)
    # R = [[10, 20], [20, 0], ...]: |11-10| = 1, |25-20| = 5, |18-20| = 2; the rest is masked.
    # (HEAD's off-by-one paired (0,0) with ref_ce[1] = 20 and would have given 9 there.)
    expected = torch.tensor([[[1.0, 5.0], [2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(excess_BTK, expected)


def test_reference_and_head_score_the_same_target_token_after_alignment():
    tokens_BT = torch.tensor([[3, 1, 4, 1, 5, 9, 2], [6, 5, 3, 5, 0, 0, 0]])
    labels_BTK = mtp_labels(tokens_BT, torch.tensor([7, 4]), horizon=3)
    # A reference whose CE depends only on the target token id: logits = -0.5 * id^2 (same at every position).
    ref_logits_BTV = (-0.5 * torch.arange(10.0) ** 2).expand(2, 7, 10)
    ref_ce_BT = reference_next_token_ce(ref_logits_BTV, labels_BTK)
    ce_of_token = torch.logsumexp(ref_logits_BTV[0, 0], dim=0) + 0.5 * torch.arange(10.0) ** 2
    head_ce_BTK = ce_of_token[labels_BTK.clamp(min=0)]
    mask = valid_mask(labels_BTK) > 0
    torch.testing.assert_close(_aligned_reference_ce(ref_ce_BT, num_heads=3)[mask], head_ce_BTK[mask])


def test_rho1_excess_zeroes_differences_below_min_ce_diff():
    mask_BTK = torch.ones(1, 2, 2)
    ce_BTK = torch.tensor([[[1.005, 1.5], [1.0, 2.0]]])
    excess_BTK = rho1_excess(ce_BTK, torch.tensor([[1.0, 1.0]]), mask_BTK, min_ce_diff=0.01)
    # R = [[1, 1], [1, 0]]: e = [[0.005, 0.5], [0, 2]]; 0.005 < 0.01 is zeroed
    torch.testing.assert_close(excess_BTK, torch.tensor([[[0.0, 0.5], [0.0, 2.0]]]))


def test_rho1_excess_falls_back_to_ones_on_the_valid_entries_of_an_all_zero_sequence():
    mask_BTK, _ = _batch_masks([3, 3], T=3, K=2)
    ce_BTK = torch.tensor([[[3.0, 1.0], [2.0, 0.0], [0.0, 0.0]], [[1.001, 1.002], [1.0, 0.0], [0.0, 0.0]]])
    ref_ce_BT = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    excess_BTK = rho1_excess(ce_BTK, ref_ce_BT, mask_BTK, min_ce_diff=0.01)
    torch.testing.assert_close(excess_BTK[0], torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(excess_BTK[1], mask_BTK[1])  # every |ce - R| < 0.01, so the row still trains uniformly


def test_token_skip_takes_the_quantile_over_valid_entries_only():
    # T=5, K=2, length 4: five valid entries with e = 1..5 and five masked entries that are 0.
    mask_BTK, _ = _batch_masks([4], T=5, K=2)
    excess_BTK = torch.zeros(1, 5, 2)
    excess_BTK[mask_BTK > 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    selected_BTK = token_skip_selection(excess_BTK, mask_BTK, percentile=0.5)
    # median over valid entries is 3 -> keep e = 3, 4, 5
    assert selected_BTK[mask_BTK > 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert selected_BTK[mask_BTK == 0].sum() == 0
    # The original included the padding zeros: its median is 0.5 and it would have kept all five entries.
    assert torch.quantile(excess_BTK.flatten(), 0.5).item() == pytest.approx(0.5)


def test_token_skip_selects_nothing_in_a_sequence_without_valid_entries():
    mask_BTK, _ = _batch_masks([3, 1], T=3, K=2)
    selected_BTK = token_skip_selection(torch.rand(2, 3, 2), mask_BTK, percentile=0.3)
    assert selected_BTK[1].sum() == 0
    assert selected_BTK[0].sum() >= 1


# ---------------------------------------------------------------- critic: rewards, returns, head scores


def test_discounted_cumsum_matches_a_hand_computed_three_step_example():
    x_BT = torch.tensor([[1.0, 2.0, 3.0]])
    # y2 = 3; y1 = 2 + 0.5 * 3 = 3.5; y0 = 1 + 0.5 * 3.5 = 2.75
    torch.testing.assert_close(discounted_cumsum(x_BT, factor=0.5), torch.tensor([[2.75, 3.5, 3.0]]))
    torch.testing.assert_close(discounted_cumsum(x_BT, factor=0.0), x_BT)


def test_spread_rewards_divides_by_each_rows_real_length_not_the_padded_length():
    valid_BT = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    rewards_BT = spread_rewards(torch.tensor([6.0, 1.0]), valid_BT)
    torch.testing.assert_close(rewards_BT, torch.tensor([[2.0, 2.0, 2.0, 0.0], [0.5, 0.5, 0.0, 0.0]]))


def test_value_pretrain_targets_are_the_discounted_reward_to_go_and_zero_on_padding():
    valid_BT = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    targets_BT = value_pretrain_targets(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), valid_BT, gamma=1.0, gae_lambda=0.5)
    torch.testing.assert_close(targets_BT, torch.tensor([[1.75, 1.5, 1.0, 0.0]]))


def _naive_gae_returns(values_BT, rewards_BT, lengths, *, gamma, gae_lambda):
    returns = torch.zeros_like(values_BT)
    for b, length in enumerate(lengths):
        advantage = 0.0
        for t in reversed(range(length)):
            next_value = values_BT[b, t + 1].item() if t + 1 < length else 0.0
            delta = rewards_BT[b, t].item() + gamma * next_value - values_BT[b, t].item()
            advantage = delta + gamma * gae_lambda * advantage
            returns[b, t] = values_BT[b, t].item() + advantage
    return returns


def test_gae_returns_match_a_naive_reverse_loop_and_ignore_values_on_padding():
    lengths = [4, 2]
    _, valid_BT = _batch_masks(lengths, T=4, K=1)
    values_BT = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.5, 0.5, 1e6, -1e6]], requires_grad=True)
    rewards_BT = spread_rewards(torch.tensor([2.0, -1.0]), valid_BT)
    returns_BT = gae_returns(values_BT, rewards_BT, valid_BT, gamma=0.9, gae_lambda=0.8)
    expected = _naive_gae_returns(values_BT.detach(), rewards_BT, lengths, gamma=0.9, gae_lambda=0.8)
    torch.testing.assert_close(returns_BT, expected)
    assert not returns_BT.requires_grad


def test_critic_head_scores_take_the_td_difference_of_the_predicted_token():
    values_BT = torch.tensor([[1.0, 2.0, 4.0], [2.0, 8.0, 100.0]], requires_grad=True)
    valid_BT = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores_BTK = critic_head_scores(values_BT, valid_BT, discount_lambda=0.5, horizon=2)
    # row 0: delta = [1, 2 - 0.5 * 1, 4 - 0.5 * 2] = [1, 1.5, 3]; u[t, k] = delta[t + k + 1], 0 past T
    torch.testing.assert_close(scores_BTK[0], torch.tensor([[1.5, 3.0], [3.0, 0.0], [0.0, 0.0]]))
    # row 1 (length 2): its only valid head (0, 0) scores delta[1] = 8 - 0.5 * 2 = 7
    assert scores_BTK[1, 0, 0].item() == 7.0
    assert not scores_BTK.requires_grad


# ---------------------------------------------------------------- weight_stats


def test_weight_stats_reports_valid_entry_extremes_and_mean_head_entropy_as_0_dim_tensors():
    weights_BTK = torch.tensor([[[0.25, 0.75], [1.0, 9.0], [0.0, 0.0], [5.0, 5.0]]])
    mask_BTK = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    stats = weight_stats(weights_BTK, mask_BTK)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
    # valid weights 0.25, 0.75, 1, 0, 0; entropies: -(1/4 ln 1/4 + 3/4 ln 3/4), 0 (one head), 0 (no weight: 0 log 0);
    # the last position has no valid head and is left out of the mean (3 positions, not 4)
    entropy0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert stats["weight_mean"].item() == pytest.approx(2.0 / 5.0)
    assert stats["weight_max"].item() == pytest.approx(1.0)
    assert stats["weight_min"].item() == pytest.approx(0.0)
    assert stats["weight_entropy"].item() == pytest.approx(entropy0 / 3.0)


def test_weight_stats_are_zero_when_nothing_is_valid():
    stats = weight_stats(torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
    assert set(stats) == {"weight_mean", "weight_max", "weight_min", "weight_entropy"}
    assert all(v.dim() == 0 and v.item() == 0.0 for v in stats.values())


# ---------------------------------------------------------------- properties over random batches


@PROPERTY
@given(case=cases(), mode=st.sampled_from(["head_softmax", "token_mean1_clip"]), temperature=st.floats(0.1, 5.0))
def test_normalized_weights_are_finite_nonnegative_and_zero_where_masked(case, mode, temperature):
    mask_BTK, _ = _batch_masks(case.lengths, T=case.T, K=case.K)
    scores_BTK = _garbage_where_masked(case.randn(case.B, case.T, case.K), mask_BTK)
    weights = normalize_weights(scores_BTK, mask_BTK, mode=mode, temperature=temperature, max_weight=3.0)
    assert torch.isfinite(weights).all()
    assert (weights >= 0).all()
    assert (weights[mask_BTK == 0] == 0).all()


@PROPERTY
@given(case=cases(), temperature=st.floats(0.1, 5.0))
def test_head_softmax_sums_to_one_at_every_position_with_a_valid_head(case, temperature):
    mask_BTK, _ = _batch_masks(case.lengths, T=case.T, K=case.K)
    scores_BTK = _garbage_where_masked(case.randn(case.B, case.T, case.K), mask_BTK)
    weights = normalize_weights(scores_BTK, mask_BTK, mode="head_softmax", temperature=temperature, max_weight=1.0)
    has_head_BT = mask_BTK.sum(-1) > 0
    sums = weights.sum(-1)
    torch.testing.assert_close(sums[has_head_BT], torch.ones_like(sums[has_head_BT]), atol=1e-5, rtol=0)
    assert (sums[~has_head_BT] == 0).all()


@PROPERTY
@given(case=cases(), temperature=st.floats(0.1, 5.0), max_weight=st.floats(1.0, 10.0))
def test_token_mean1_has_mean_one_over_valid_entries_before_clipping_and_stays_under_max_weight(
    case, temperature, max_weight
):
    mask_BTK, _ = _batch_masks(case.lengths, T=case.T, K=case.K)
    scores_BTK = _garbage_where_masked(case.randn(case.B, case.T, case.K), mask_BTK)
    valid = mask_BTK > 0
    unclipped = _mean_one(scores_BTK, mask_BTK, temperature)
    if valid.any():
        assert unclipped[valid].mean().item() == pytest.approx(1.0, abs=1e-4)
    weights = normalize_weights(
        scores_BTK, mask_BTK, mode="token_mean1_clip", temperature=temperature, max_weight=max_weight
    )
    assert (weights <= max_weight).all()
    torch.testing.assert_close(weights, unclipped.clamp(max=max_weight))


@PROPERTY
@given(case=cases(), min_ce_diff=st.floats(0.0, 1.0))
def test_rho1_excess_is_nonnegative_zero_where_masked_and_keeps_every_sequence_training(case, min_ce_diff):
    mask_BTK, _ = _batch_masks(case.lengths, T=case.T, K=case.K)
    ce_BTK = case.randn(case.B, case.T, case.K).abs() * mask_BTK
    ref_ce_BT = case.randn(case.B, case.T).abs()
    excess_BTK = rho1_excess(ce_BTK, ref_ce_BT, mask_BTK, min_ce_diff=min_ce_diff)
    assert torch.isfinite(excess_BTK).all() and (excess_BTK >= 0).all()
    assert (excess_BTK[mask_BTK == 0] == 0).all()
    has_valid_B = mask_BTK.sum(dim=(1, 2)) > 0
    assert ((excess_BTK.sum(dim=(1, 2)) > 0) == has_valid_B).all()


@PROPERTY
@given(case=cases(), percentile=st.floats(0.0, 1.0))
def test_token_skip_selects_only_valid_entries_and_at_least_one_per_sequence_with_any(case, percentile):
    mask_BTK, _ = _batch_masks(case.lengths, T=case.T, K=case.K)
    excess_BTK = case.randn(case.B, case.T, case.K).abs() * mask_BTK
    selected_BTK = token_skip_selection(excess_BTK, mask_BTK, percentile=percentile)
    assert set(selected_BTK.unique().tolist()) <= {0.0, 1.0}
    assert (selected_BTK[mask_BTK == 0] == 0).all()
    has_valid_B = mask_BTK.sum(dim=(1, 2)) > 0
    assert ((selected_BTK.sum(dim=(1, 2)) >= 1) == has_valid_B).all()


@PROPERTY
@given(case=cases(), factor=st.floats(0.0, 1.0))
def test_discounted_cumsum_equals_a_naive_loop(case, factor):
    x_BT = case.randn(case.B, case.T)
    expected = torch.zeros_like(x_BT)
    for b in range(case.B):
        running = 0.0
        for t in reversed(range(case.T)):
            running = x_BT[b, t].item() + factor * running
            expected[b, t] = running
    torch.testing.assert_close(discounted_cumsum(x_BT, factor=factor), expected, atol=1e-4, rtol=1e-4)


@PROPERTY
@given(case=cases(), gamma=st.floats(0.5, 1.0), gae_lambda=st.floats(0.5, 1.0))
def test_gae_returns_equal_a_naive_reverse_loop_on_random_batches(case, gamma, gae_lambda):
    _, valid_BT = _batch_masks(case.lengths, T=case.T, K=case.K)
    values_BT = case.randn(case.B, case.T)
    rewards_BT = spread_rewards(case.randn(case.B), valid_BT)
    returns_BT = gae_returns(values_BT, rewards_BT, valid_BT, gamma=gamma, gae_lambda=gae_lambda)
    expected = _naive_gae_returns(values_BT, rewards_BT, case.lengths, gamma=gamma, gae_lambda=gae_lambda)
    torch.testing.assert_close(returns_BT, expected, atol=1e-4, rtol=1e-4)


@PROPERTY
@given(case=cases(), mode=st.sampled_from(["head_softmax", "token_mean1_clip"]))
def test_weight_stats_are_finite_and_entropy_is_between_zero_and_log_k(case, mode):
    mask_BTK, _ = _batch_masks(case.lengths, T=case.T, K=case.K)
    weights = normalize_weights(
        case.randn(case.B, case.T, case.K), mask_BTK, mode=mode, temperature=1.0, max_weight=3.0
    )
    stats = weight_stats(weights, mask_BTK)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in stats.values())
    assert -1e-6 <= stats["weight_entropy"].item() <= math.log(case.K) + 1e-5
