"""Per-head analysis: how well each head k predicts token t + k + 1 on held-out records (top-1 accuracy and mean
cross-entropy over the positions that have such a token; padding and positions past a sequence's end do not count).

Shapes: B batch, T time, K heads, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmtp_core.data.records import Record
from wmtp_core.data.sequences import IGNORE_INDEX, MTPCollator, TokenSequences
from wmtp_core.data.tokens import Tokenizer


def head_accuracy(
    model: torch.nn.Module, tokenizer: Tokenizer, records: list[Record], *, max_len: int, batch_size: int = 8
) -> list[dict]:
    """Per head k: {"head": k, "top1_accuracy", "cross_entropy" (nats, mean per token), "tokens" (positions scored)}.

    The records are read as training reads them (format_example, truncated to max_len tokens), in batches of
    batch_size, without gradients.
    """
    if max_len > model.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={model.max_seq_len}; lower it")
    sequences = TokenSequences(records, tokenizer, max_len=max_len)
    collate = MTPCollator(horizon=model.horizon, pad_id=tokenizer.pad_id)
    device = next(model.parameters()).device
    correct_K = torch.zeros(model.horizon, dtype=torch.float64)
    ce_sum_K = torch.zeros(model.horizon, dtype=torch.float64)
    count_K = torch.zeros(model.horizon, dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            batch = collate([sequences[i] for i in range(start, min(start + batch_size, len(sequences)))])
            logits_BTKV = model(batch["tokens"].to(device)).float()
            correct, ce_sum, count = _head_sums(logits_BTKV, batch["labels"].to(device))
            correct_K += correct.cpu()
            ce_sum_K += ce_sum.cpu()
            count_K += count.cpu()
    return [
        {
            "head": k,
            "top1_accuracy": float(correct_K[k] / count_K[k]) if count_K[k] else float("nan"),
            "cross_entropy": float(ce_sum_K[k] / count_K[k]) if count_K[k] else float("nan"),
            "tokens": int(count_K[k]),
        }
        for k in range(model.horizon)
    ]


def _head_sums(logits_BTKV: torch.Tensor, labels_BTK: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per head: correct top-1 predictions, summed cross-entropy and scored positions (float64)."""
    B, T, K, V = logits_BTKV.shape
    valid_BTK = labels_BTK != IGNORE_INDEX
    ce_BTK = F.cross_entropy(
        logits_BTKV.reshape(-1, V), labels_BTK.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(B, T, K)
    correct_BTK = (logits_BTKV.argmax(-1) == labels_BTK) & valid_BTK
    dims = (0, 1)
    return correct_BTK.sum(dims).double(), ce_BTK.double().sum(dims), valid_BTK.sum(dims).double()
