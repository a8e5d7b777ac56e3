"""wmtp_core.algorithms.losses against naive per-head, per-position Python loops, plus gradient and empty-batch
behaviour."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_core.algorithms.losses import (
    head_cross_entropy,
    mean_ce_per_head,
    uniform_weights,
    valid_mask,
    weighted_mtp_loss,
)
from wmtp_core.data.sequences import IGNORE_INDEX, mtp_labels


def _batch(lengths: list[int], *, T: int, K: int, V: int, seed: int = 0):
    """(logits_BTKV requiring grad, labels_BTK with sequence-end and padding ignores, random weights_BTK)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    tokens_BT = torch.randint(0, V, (B, T), generator=gen)
    labels_BTK = mtp_labels(tokens_BT, torch.tensor(lengths), horizon=K)
    logits_BTKV = torch.randn(B, T, K, V, generator=gen).requires_grad_()
    weights_BTK = torch.rand(B, T, K, generator=gen) * 2.0 + 0.05
    return logits_BTKV, labels_BTK, weights_BTK


def _naive_ce(logits_BTKV: torch.Tensor, labels_BTK: torch.Tensor) -> torch.Tensor:
    B, T, K, V = logits_BTKV.shape
    ce = torch.zeros(B, T, K)
    for b in range(B):
        for t in range(T):
            for k in range(K):
                label = int(labels_BTK[b, t, k])
                if label != IGNORE_INDEX:
                    row = logits_BTKV[b, t, k].detach().double()
                    ce[b, t, k] = float(torch.logsumexp(row, 0) - row[label])
    return ce


def _naive_loss(ce_BTK: torch.Tensor, weights_BTK: torch.Tensor, mask_BTK: torch.Tensor) -> float:
    B, T, K = ce_BTK.shape
    per_position = []
    for b in range(B):
        for t in range(T):
            wm = [float(weights_BTK[b, t, k] * mask_BTK[b, t, k]) for k in range(K)]
            if sum(wm) > 0:
                per_position.append(sum(w * float(ce_BTK[b, t, k]) for k, w in enumerate(wm)) / sum(wm))
    return sum(per_position) / len(per_position) if per_position else 0.0


def test_head_cross_entropy_matches_a_per_entry_loop_and_is_zero_on_ignored_labels():
    logits_BTKV, labels_BTK, _ = _batch([6, 3], T=6, K=3, V=11)
    ce_BTK = head_cross_entropy(logits_BTKV, labels_BTK)
    assert ce_BTK.dtype == torch.float32 and ce_BTK.shape == labels_BTK.shape
    torch.testing.assert_close(ce_BTK.detach(), _naive_ce(logits_BTKV, labels_BTK))
    assert (ce_BTK[labels_BTK == IGNORE_INDEX] == 0).all()


def test_head_cross_entropy_of_half_precision_logits_is_fp32():
    logits_BTKV, labels_BTK, _ = _batch([4], T=4, K=2, V=7)
    ce_BTK = head_cross_entropy(logits_BTKV.detach().to(torch.bfloat16), labels_BTK)
    assert ce_BTK.dtype == torch.float32


def test_weighted_mtp_loss_matches_the_naive_formula_with_nonuniform_weights_and_masks():
    logits_BTKV, labels_BTK, weights_BTK = _batch([7, 4, 2], T=7, K=3, V=13, seed=1)
    mask_BTK = valid_mask(labels_BTK)
    assert 0 < mask_BTK.sum() < mask_BTK.numel()
    ce_BTK = head_cross_entropy(logits_BTKV, labels_BTK)
    loss = weighted_mtp_loss(ce_BTK, weights_BTK, mask_BTK)
    expected = _naive_loss(_naive_ce(logits_BTKV, labels_BTK), weights_BTK, mask_BTK)
    torch.testing.assert_close(loss.detach(), torch.tensor(expected, dtype=torch.float32))


def test_positions_whose_heads_all_have_zero_weight_are_left_out_of_the_mean():
    ce_BTK = torch.tensor([[[1.0, 3.0], [5.0, 7.0], [100.0, 100.0]]])
    weights_BTK = torch.tensor([[[1.0, 3.0], [1.0, 0.0], [0.0, 0.0]]])
    loss = weighted_mtp_loss(ce_BTK, weights_BTK, torch.ones(1, 3, 2))
    # Position 0: (1*1 + 3*3) / 4 = 2.5; position 1: 5; position 2 has no weight.
    torch.testing.assert_close(loss, torch.tensor(3.75))


def test_uniform_weights_give_the_mean_of_each_positions_valid_heads():
    ce_BTK = torch.tensor([[[2.0, 4.0], [6.0, 0.0]]])
    labels_BTK = torch.tensor([[[1, 2], [3, IGNORE_INDEX]]])
    loss = weighted_mtp_loss(ce_BTK, uniform_weights(labels_BTK), valid_mask(labels_BTK))
    torch.testing.assert_close(loss, torch.tensor((3.0 + 6.0) / 2))


def test_weights_receive_no_gradient():
    logits_BTKV, labels_BTK, weights_BTK = _batch([5, 3], T=5, K=2, V=9, seed=2)
    weights_BTK.requires_grad_()
    loss = weighted_mtp_loss(head_cross_entropy(logits_BTKV, labels_BTK), weights_BTK, valid_mask(labels_BTK))
    loss.backward()
    assert weights_BTK.grad is None or not weights_BTK.grad.any()
    assert logits_BTKV.grad is not None and logits_BTKV.grad.abs().sum() > 0


def test_logits_gradient_is_the_weighted_softmax_minus_one_hot():
    logits_BTKV, labels_BTK, weights_BTK = _batch([3], T=3, K=2, V=5, seed=3)
    mask_BTK = valid_mask(labels_BTK)
    weighted_mtp_loss(head_cross_entropy(logits_BTKV, labels_BTK), weights_BTK, mask_BTK).backward()
    wm_BTK = weights_BTK * mask_BTK
    num_positions = int((wm_BTK.sum(-1) > 0).sum())
    coef_BTK = wm_BTK / wm_BTK.sum(-1, keepdim=True).clamp_min(1e-8) / num_positions
    one_hot_BTKV = F.one_hot(labels_BTK.clamp_min(0), 5).float()
    expected = coef_BTK[..., None] * (logits_BTKV.detach().softmax(-1) - one_hot_BTKV)
    torch.testing.assert_close(logits_BTKV.grad, expected)


def test_all_ignored_batch_gives_zero_loss_and_backward_works():
    logits_BTKV = torch.randn(2, 3, 2, 7, requires_grad=True)
    labels_BTK = torch.full((2, 3, 2), IGNORE_INDEX)
    loss = weighted_mtp_loss(
        head_cross_entropy(logits_BTKV, labels_BTK), uniform_weights(labels_BTK), valid_mask(labels_BTK)
    )
    loss.backward()
    assert loss.item() == 0.0
    assert logits_BTKV.grad is not None and not logits_BTKV.grad.any()


def test_mean_ce_per_head_matches_a_loop_and_is_zero_for_a_head_with_no_targets():
    logits_BTKV, labels_BTK, _ = _batch([6, 2], T=6, K=4, V=8, seed=4)
    labels_BTK[..., 3] = IGNORE_INDEX
    ce_BTK = head_cross_entropy(logits_BTKV, labels_BTK).detach()
    mask_BTK = valid_mask(labels_BTK)
    expected = []
    for k in range(4):
        values = [float(ce_BTK[b, t, k]) for b in range(2) for t in range(6) if mask_BTK[b, t, k]]
        expected.append(sum(values) / len(values) if values else 0.0)
    torch.testing.assert_close(mean_ce_per_head(ce_BTK, mask_BTK), torch.tensor(expected))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=3),
    K=st.integers(min_value=1, max_value=4),
    V=st.integers(min_value=2, max_value=9),
    zero_fraction=st.sampled_from([0.0, 0.3, 0.7]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_weighted_mtp_loss_matches_naive_formula_for_random_shapes(lengths, K, V, zero_fraction, seed):
    logits_BTKV, labels_BTK, weights_BTK = _batch(lengths, T=max(lengths), K=K, V=V, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    weights_BTK = weights_BTK * (torch.rand(weights_BTK.shape, generator=gen) >= zero_fraction)
    mask_BTK = valid_mask(labels_BTK)
    ce_BTK = head_cross_entropy(logits_BTKV, labels_BTK)
    loss = weighted_mtp_loss(ce_BTK, weights_BTK, mask_BTK)
    expected = _naive_loss(_naive_ce(logits_BTKV, labels_BTK), weights_BTK, mask_BTK)
    torch.testing.assert_close(loss.detach(), torch.tensor(expected, dtype=torch.float32))
    assert math.isfinite(loss.item())
    loss.backward()
    assert torch.isfinite(logits_BTKV.grad).all()
