"""MBPP-style JSONL records -> token sequences -> MTP batches, with a resumable, seeded batch order.

Shapes: B batch, T sequence length, K horizon (number of MTP heads).
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from wmtp_core.data.records import DataError, Record, format_example
from wmtp_core.data.tokens import Tokenizer

IGNORE_INDEX = -100


class TokenSequences(Dataset):
    """Records tokenized once up front; item i is {"tokens": LongTensor of at most max_len ids, "reward": float}."""

    def __init__(self, records: list[Record], tokenizer: Tokenizer, *, max_len: int):
        self.sequences = [torch.tensor(tokenizer.encode(format_example(r))[:max_len]) for r in records]
        self.rewards = [r.reward for r in records]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict:
        return {"tokens": self.sequences[index], "reward": self.rewards[index]}


@dataclass(frozen=True)
class MTPCollator:
    """Pads items to tokens_BT, builds labels_BTK[b, t, k] = tokens[b, t + k + 1] and stacks rewards_B.

    Labels past the end of a sequence or on padding are IGNORE_INDEX. A dataclass (not a closure)
    so DataLoader workers started with `spawn` can pickle it.
    """

    horizon: int
    pad_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        lengths_B = torch.tensor([len(item["tokens"]) for item in items])
        tokens_BT = torch.full((len(items), int(lengths_B.max())), self.pad_id, dtype=torch.long)
        for b, item in enumerate(items):
            tokens_BT[b, : len(item["tokens"])] = item["tokens"]
        return {
            "tokens": tokens_BT,
            "labels": mtp_labels(tokens_BT, lengths_B, horizon=self.horizon),
            "rewards": torch.tensor([float(item["reward"]) for item in items]),
        }


def mtp_labels(tokens_BT: torch.Tensor, lengths_B: torch.Tensor, *, horizon: int) -> torch.Tensor:
    """labels_BTK[b, t, k] = tokens_BT[b, t + k + 1] where t + k + 1 < lengths_B[b], else IGNORE_INDEX."""
    B, T = tokens_BT.shape
    target_pos_TK = torch.arange(T)[:, None] + torch.arange(1, horizon + 1)[None, :]
    gathered_BTK = tokens_BT[:, target_pos_TK.clamp(max=T - 1)]
    valid_BTK = target_pos_TK[None] < lengths_B[:, None, None]
    return torch.where(valid_BTK, gathered_BTK, torch.full_like(gathered_BTK, IGNORE_INDEX))


def epoch_batches(num_examples: int, *, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batch order of one epoch: a shuffle fixed by (seed, epoch); the last partial batch is dropped."""
    if num_examples < batch_size:
        raise DataError(f"{num_examples} training examples are fewer than data.batch_size={batch_size}; lower it")
    order = list(range(num_examples))
    random.Random(f"wmtp-data-{seed}-{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, num_examples - batch_size + 1, batch_size)]


def make_loader(
    dataset: TokenSequences,
    batches: list[list[int]],
    collator: MTPCollator,
    *,
    num_workers: int,
    worker_start: str = "default",
) -> DataLoader:
    """A DataLoader that yields exactly `batches` in order (resuming passes the remaining ones)."""
    context = None if worker_start == "default" or num_workers == 0 else worker_start
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collator,
        num_workers=num_workers,
        multiprocessing_context=context,
        worker_init_fn=ignore_termination,
    )


def ignore_termination(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the training process, which saves and then shuts them down.

    Launchers such as torchrun signal the whole process group on cancellation; a worker killed first would make the
    next batch raise in the trainer before its orderly stop. A worker still exits when its parent dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
