"""The weight rules of wmtp_core.weights on hand-computed tensors, and their properties under hypothesis."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_core.data import mtp_labels
from wmtp_core.losses import valid_mask
from wmtp_core.weights import (
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

T_ = torch.tensor


def test_head_softmax_spreads_over_valid_heads_only():
    scores = T_([[[0.0, math.log(3.0), 5.0], [1.0, 1.0, 1.0]]])
    mask = T_([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    w = normalize_weights(scores, mask, mode="head_softmax", temperature=1.0, max_weight=9.0)
    torch.testing.assert_close(w, T_([[[0.25, 0.75, 0.0], [0.0, 0.0, 0.0]]]))


def test_token_mean1_clip_has_mean_one_then_clips():
    scores = T_([[[0.0, math.log(3.0)], [math.log(8.0), 0.0]]])
    mask = T_([[[1.0, 1.0], [1.0, 0.0]]])
    # exp(scores) on valid pairs: 1, 3, 8 -> mean 4 -> 0.25, 0.75, 2.0; clip at 1.5
    torch.testing.assert_close(_mean_one(scores, mask, 1.0), T_([[[0.25, 0.75], [2.0, 0.0]]]))
    w = normalize_weights(scores, mask, mode="token_mean1_clip", temperature=1.0, max_weight=1.5)
    torch.testing.assert_close(w, T_([[[0.25, 0.75], [1.5, 0.0]]]))


def test_reference_ce_at_t_plus_k_is_paired_with_head_k_at_t():
    # One row of 4 real tokens and horizon 2: head k at t predicts token t+k+1, as does the reference at t+k.
    tokens = T_([[5, 6, 7, 8]])
    labels = mtp_labels(tokens, T_([4]), horizon=2)
    ref_logits = torch.zeros(1, 4, 10)
    ref_logits[0, torch.arange(4), T_([6, 7, 8, 0])] = T_([2.0, 1.0, 0.0, 0.0])  # confidence on the next token
    ref_ce = reference_next_token_ce(ref_logits, labels)
    expected_ref = [-torch.log_softmax(ref_logits[0, t], -1)[tok].item() for t, tok in enumerate([6, 7, 8])] + [0.0]
    torch.testing.assert_close(ref_ce, T_([expected_ref]))
    ce = torch.full((1, 4, 2), 3.0)
    e = rho1_excess(ce, ref_ce, valid_mask(labels), min_ce_diff=0.0)
    r = expected_ref
    expected = T_([[[3 - r[0], 3 - r[1]], [3 - r[1], 3 - r[2]], [3 - r[2], 0.0], [0.0, 0.0]]]).abs()
    torch.testing.assert_close(e, expected)


def test_rho1_excess_drops_small_differences_and_keeps_all_zero_rows():
    ce = T_([[[1.0, 1.0]], [[1.0, 1.0]]])  # B=2, T=1, K=2
    ref = T_([[0.995], [0.2]])  # the second head (t+1) is past the end: aligned reference 0
    mask = T_([[[1.0, 0.0]], [[1.0, 0.0]]])
    e = rho1_excess(ce, ref, mask, min_ce_diff=0.01)
    torch.testing.assert_close(e, T_([[[1.0, 0.0]], [[0.8, 0.0]]]))  # row 0 fell below the threshold -> ones


def test_token_skip_quantile_ignores_padding():
    e = T_([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])
    mask = T_([[[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    s = token_skip_selection(e, mask, percentile=0.5)
    # median of {1,2,3,4} is 2.5 -> keep 3 and 4; with the padding zeros the median would be 1.5 and keep 2 as well
    torch.testing.assert_close(s, T_([[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]))


def test_discounted_cumsum_by_hand():
    torch.testing.assert_close(discounted_cumsum(T_([[1.0, 2.0, 4.0]]), factor=0.5), T_([[1 + 1 + 1.0, 2 + 2.0, 4.0]]))


def test_rewards_spread_over_real_length_not_padded_length():
    valid = T_([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(spread_rewards(T_([1.0, 1.0]), valid), T_([[0.25] * 4, [0.5, 0.5, 0.0, 0.0]]))


def test_value_pretrain_targets_are_discounted_reward_to_go():
    valid = T_([[1.0, 1.0, 0.0]])
    targets = value_pretrain_targets(spread_rewards(T_([1.0]), valid), valid, gamma=1.0, gae_lambda=0.5)
    torch.testing.assert_close(targets, T_([[0.5 + 0.25, 0.5, 0.0]]))


def _naive_gae(values, rewards, length, gamma, lam):
    returns, advantage = [0.0] * len(values), 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        advantage = rewards[t] + gamma * next_value - values[t] + gamma * lam * advantage
        returns[t] = values[t] + advantage
    return returns


def test_gae_returns_match_a_reverse_loop():
    values, rewards = [0.3, -0.2, 0.5, 9.0], [0.1, 0.0, 0.4, 9.0]
    valid = T_([[1.0, 1.0, 1.0, 0.0]])
    got = gae_returns(T_([values]), T_([rewards]) * valid, valid, gamma=0.9, gae_lambda=0.8)
    torch.testing.assert_close(got, T_([_naive_gae(values, rewards, 3, 0.9, 0.8)]))


def test_critic_scores_pair_head_k_with_delta_at_t_plus_k_plus_1():
    values = T_([[1.0, 2.0, 4.0]])
    delta = [1.0, 2.0 - 0.5 * 1.0, 4.0 - 0.5 * 2.0]
    u = critic_head_scores(values, torch.ones(1, 3), discount_lambda=0.5, horizon=2)
    torch.testing.assert_close(u, T_([[[delta[1], delta[2]], [delta[2], 0.0], [0.0, 0.0]]]))


def test_weight_stats_entropy_of_uniform_heads_is_log_k():
    w = torch.full((1, 2, 4), 0.25)
    stats = weight_stats(w, torch.ones(1, 2, 4))
    torch.testing.assert_close(stats["weight_entropy"], torch.tensor(math.log(4.0)))
    assert float(stats["weight_max"]) == float(stats["weight_min"]) == 0.25


@st.composite
def masked_scores(draw):
    B, T, K = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    lengths = torch.tensor([draw(st.integers(1, T)) for _ in range(B)])
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tokens = torch.randint(0, 50, (B, T), generator=generator)
    labels = mtp_labels(tokens, lengths, horizon=K)
    scores = torch.randn(B, T, K, generator=generator) * draw(st.floats(0.1, 20.0))
    return scores, valid_mask(labels), labels


@settings(max_examples=60, deadline=None)
@given(masked_scores(), st.sampled_from(["head_softmax", "token_mean1_clip"]), st.floats(0.1, 3.0))
def test_weights_are_finite_nonnegative_and_zero_where_masked(case, mode, temperature):
    scores, mask, _ = case
    w = normalize_weights(scores, mask, mode=mode, temperature=temperature, max_weight=3.0)
    assert torch.isfinite(w).all() and (w >= 0).all() and (w[mask == 0] == 0).all()
    has_head = mask.sum(-1) > 0
    if mode == "head_softmax":
        torch.testing.assert_close(w.sum(-1)[has_head], torch.ones(int(has_head.sum())), atol=1e-5, rtol=0)
    else:
        assert (w <= 3.0).all()
        unclipped = _mean_one(scores, mask, temperature)
        if mask.sum() > 0:
            assert abs(float(unclipped[mask > 0].mean()) - 1.0) < 1e-4


@settings(max_examples=60, deadline=None)
@given(masked_scores(), st.floats(0.0, 0.99))
def test_token_skip_keeps_only_valid_entries_and_at_least_one_per_sequence(case, percentile):
    scores, mask, _ = case
    excess = rho1_excess(scores.abs(), torch.zeros(scores.shape[:2]), mask, min_ce_diff=0.01)
    s = token_skip_selection(excess, mask, percentile=percentile)
    assert (s[mask == 0] == 0).all()
    rows_with_targets = mask.sum(dim=(1, 2)) > 0
    assert (s.sum(dim=(1, 2))[rows_with_targets] >= 1).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=15), st.floats(0.0, 1.0))
def test_discounted_cumsum_matches_a_loop(xs, factor):
    expected = [sum(factor ** (j - t) * xs[j] for j in range(t, len(xs))) for t in range(len(xs))]
    got = discounted_cumsum(torch.tensor([xs], dtype=torch.float64), factor=factor)
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["head_softmax", "token_mean1_clip"])
def test_weights_carry_no_gradient(mode):
    scores = torch.randn(2, 3, 2, requires_grad=True)
    w = normalize_weights(scores, torch.ones(2, 3, 2), mode=mode, temperature=0.7, max_weight=3.0)
    assert not w.requires_grad
