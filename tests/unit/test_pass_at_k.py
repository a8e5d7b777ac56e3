"""wmtp_core.evaluation.pass_at_k against values computed by hand from 1 - C(n-c, k) / C(n, k)."""

from __future__ import annotations

import math

import pytest

from wmtp_core.evaluation.pass_at_k import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (10, 3, 1, 0.3),  # pass@1 is the fraction that passed
        (6, 1, 3, 0.5),  # 1 - C(5,3)/C(6,3) = 1 - 10/20
        (2, 0, 2, 0.0),  # n = k, nothing passed
        (3, 1, 3, 1.0),  # n = k, something passed: every draw holds it
        (1, 0, 1, 0.0),
        (1, 1, 1, 1.0),
        (20, 0, 5, 0.0),  # c = 0
        (20, 20, 5, 1.0),  # c = n
        (20, 17, 5, 1.0),  # n - c < k
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_stays_exact_for_hundreds_of_samples():
    exact = 1 - math.comb(187, 100) / math.comb(200, 100)  # Python integers: the binomials are exact
    assert pass_at_k(200, 13, 100) == pytest.approx(exact, rel=1e-12)


def test_fewer_samples_than_k_is_refused_with_what_to_change():
    with pytest.raises(ValueError, match=r"pass@10 needs at least 10 samples per problem, got n=5"):
        pass_at_k(5, 1, 10)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 1, 0)])
def test_impossible_counts_are_refused(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_over_problems():
    assert mean_pass_at_k([(5, 2), (1, 1), (4, 0)], 1) == pytest.approx((0.4 + 1.0 + 0.0) / 3)


def test_mean_pass_at_k_of_no_problems_is_refused():
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], 1)
