"""wmtp_core.generation.head_analysis: per-head top-1 accuracy and cross-entropy against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wmtp_core.data.records import builtin_dataset_path, format_example, load_records
from wmtp_core.generation import head_accuracy
from wmtp_core.models.tokenizer import ByteTokenizer
from wmtp_core.models.transformer import MTPTransformer
from wmtp_core.recipes import TINY_MODEL, load_recipe

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def model() -> MTPTransformer:
    recipe = load_recipe(None, [*TINY_MODEL, "model.horizon=3", "model.max_seq_len=320"])
    torch.manual_seed(0)
    return MTPTransformer(recipe.model, vocab_size=TOKENIZER.vocab_size).eval()


def _direct(model, records, *, max_len: int) -> list[tuple[float, float]]:
    """(accuracy, mean CE) per head, one record at a time, position by position: no padding, no batching."""
    hits, losses = [[] for _ in range(model.horizon)], [[] for _ in range(model.horizon)]
    with torch.no_grad():
        for record in records:
            ids = TOKENIZER.encode(format_example(record))[:max_len]
            logits_TKV = model(torch.tensor([ids]))[0]
            for k in range(model.horizon):
                for t in range(len(ids) - k - 1):
                    target = ids[t + k + 1]
                    hits[k].append(float(logits_TKV[t, k].argmax() == target))
                    losses[k].append(float(-F.log_softmax(logits_TKV[t, k], dim=-1)[target]))
    return [(sum(h) / len(h), sum(c) / len(c)) for h, c in zip(hits, losses)]


def test_per_head_accuracy_and_cross_entropy_equal_a_direct_computation(model):
    # Records of different lengths, some cut at max_len, in batches of 2: padding must not count.
    records = load_records(builtin_dataset_path())[:5]
    lengths = [len(TOKENIZER.encode(format_example(r))) for r in records]
    assert min(lengths) < 280 < max(lengths) and len(set(lengths)) > 3
    rows = head_accuracy(model, TOKENIZER, records, max_len=280, batch_size=2)
    expected = _direct(model, records, max_len=280)
    assert [row["head"] for row in rows] == [0, 1, 2]
    for row, (accuracy, cross_entropy), k in zip(rows, expected, range(3)):
        assert row["top1_accuracy"] == pytest.approx(accuracy)
        assert row["cross_entropy"] == pytest.approx(cross_entropy, rel=1e-5)
        assert row["tokens"] == sum(min(n, 280) - k - 1 for n in lengths)
    # an untrained model is near chance: CE close to log(vocabulary)
    assert rows[0]["cross_entropy"] == pytest.approx(math.log(TOKENIZER.vocab_size), rel=0.1)


def test_a_max_len_beyond_the_model_is_refused(model):
    with pytest.raises(ValueError, match="max_len=321 exceeds model.max_seq_len=320"):
        head_accuracy(model, TOKENIZER, load_records(builtin_dataset_path())[:1], max_len=321)
