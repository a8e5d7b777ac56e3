"""wmtp_core.models.transformer: head output shapes, causality, the sequence-length limit, and overfitting one batch."""

from __future__ import annotations

import pytest
import torch

from wmtp_core.algorithms.losses import head_cross_entropy, uniform_weights, valid_mask, weighted_mtp_loss
from wmtp_core.data.sequences import IGNORE_INDEX, MTPCollator
from wmtp_core.models.transformer import MTPTransformer

VOCAB = 64


@pytest.fixture
def model(tiny_recipe) -> MTPTransformer:
    torch.manual_seed(0)
    return MTPTransformer(tiny_recipe.model, vocab_size=VOCAB).eval()


def test_logits_have_shape_batch_time_horizon_vocab(model, tiny_recipe):
    tokens_BT = torch.randint(0, VOCAB, (3, 16))
    logits_BTKV = model(tokens_BT)
    assert logits_BTKV.shape == (3, 16, tiny_recipe.model.horizon, VOCAB)
    assert torch.isfinite(logits_BTKV).all()


def test_heads_give_different_predictions(model):
    logits_BTKV = model(torch.randint(0, VOCAB, (2, 8)))
    assert not torch.allclose(logits_BTKV[:, :, 0], logits_BTKV[:, :, 1])


@pytest.mark.parametrize("t", [0, 5, 14])
def test_logits_at_or_before_t_ignore_later_tokens(model, t):
    gen = torch.Generator().manual_seed(t)
    tokens_BT = torch.randint(0, VOCAB, (2, 16), generator=gen)
    changed_BT = tokens_BT.clone()
    changed_BT[:, t + 1 :] = (
        tokens_BT[:, t + 1 :] + 1 + torch.randint(0, VOCAB - 1, (2, 15 - t), generator=gen)
    ) % VOCAB
    assert (changed_BT[:, t + 1 :] != tokens_BT[:, t + 1 :]).all()
    with torch.no_grad():
        before, after = model(tokens_BT), model(changed_BT)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


def test_sequence_longer_than_max_seq_len_raises_value_error(model, tiny_recipe):
    too_long = tiny_recipe.model.max_seq_len + 1
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, too_long, dtype=torch.long))
    assert model(torch.zeros(1, too_long - 1, dtype=torch.long)).shape[1] == too_long - 1


def test_value_head_is_in_the_state_dict_only_when_asked(tiny_recipe):
    plain = MTPTransformer(tiny_recipe.model, vocab_size=VOCAB)
    critic = MTPTransformer(tiny_recipe.model, vocab_size=VOCAB, with_value_head=True)
    assert not any(k.startswith("value_head.") for k in plain.state_dict())
    assert any(k.startswith("value_head.") for k in critic.state_dict())
    h_BTD = critic.trunk_hidden(torch.zeros(2, 5, dtype=torch.long))
    assert critic.value_head(h_BTD).shape == (2, 5)


def _uniform_loss(model: MTPTransformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels_BTK = batch["labels"]
    ce_BTK = head_cross_entropy(model(batch["tokens"]), labels_BTK)
    return weighted_mtp_loss(ce_BTK, uniform_weights(labels_BTK), valid_mask(labels_BTK))


@pytest.fixture
def one_thread():
    # Tiny matmuls gain nothing from intra-op threads, and on a busy CI box their barriers make 60 steps ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_overfitting_one_batch_drives_the_weighted_mtp_loss_down(tiny_recipe, one_thread):
    torch.manual_seed(0)
    model = MTPTransformer(tiny_recipe.model, vocab_size=VOCAB)
    items = [{"tokens": torch.randint(0, VOCAB, (n,)), "reward": 1.0} for n in (16, 11)]
    batch = MTPCollator(horizon=tiny_recipe.model.horizon, pad_id=0)(items)
    assert (batch["labels"] == IGNORE_INDEX).any()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = _uniform_loss(model, batch).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = _uniform_loss(model, batch)
        loss.backward()
        optimizer.step()
    final = _uniform_loss(model, batch).item()
    assert final < 0.3 * start, (start, final)
