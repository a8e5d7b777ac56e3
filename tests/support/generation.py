"""Models whose heads agree, for the generation tests: a few hundred Adam steps of multi-token prediction on
alphabet walks ("cdefg", "acegi": a start letter, a stride of 1 or 2, ending in eos at 'z' or earlier), which any
head can learn to continue. Random weights would leave every draft rejected and never reach eos."""

from __future__ import annotations

import random
import string

import torch
import torch.nn.functional as F

from wmtp_core.data.sequences import IGNORE_INDEX, MTPCollator

PROMPTS = [
    *(string.ascii_lowercase[i : i + n] for i, n in [(0, 1), (2, 3), (5, 2), (9, 4), (14, 1), (17, 5), (21, 2)]),
    *("".join(string.ascii_lowercase[i::2][:n]) for i, n in [(0, 3), (1, 2), (4, 4), (7, 3)]),
    "xyz",
    "y",
    "ab",
    "mnopqrst",
    "hello",
    "q",
    "bdfh",
    "klm",
    "a c e",
    "zz",
]
"""Walks of different lengths and strides, the end of the alphabet (eos at once), and text the walks never had."""


def alphabet_walk(rng: random.Random) -> str:
    start, stride = rng.randrange(26), rng.choice((1, 2))
    walk = string.ascii_lowercase[start::stride]
    return walk[: rng.randint(1, len(walk))] if rng.random() < 0.3 else walk


def train_on_walks(model: torch.nn.Module, tokenizer, *, steps: int = 250, batch_size: int = 16, seed: int = 0):
    """Train every head to predict its token of bos + walk + eos; returns the model in eval mode."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    collate = MTPCollator(horizon=model.horizon, pad_id=tokenizer.pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        items = [
            {"tokens": torch.tensor(tokenizer.encode(alphabet_walk(rng))), "reward": 1.0} for _ in range(batch_size)
        ]
        batch = collate(items)
        logits_BTKV = model(batch["tokens"])
        loss = F.cross_entropy(logits_BTKV.flatten(0, 2), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def decode_in_blocks(
    model: torch.nn.Module, tokens_BT: torch.Tensor, block_ends: list[int], *, crop: int, on_crop=None
):
    """(the full forward's logits_BTKV, decode's for the same tokens): decode reads tokens_BT in blocks ending at
    block_ends, the cache is cut back to `crop` positions (rejected drafts; on_crop(cache) may look at it then),
    and the rest is read from there. Every head decodes."""
    cache = model.new_cache()
    with torch.no_grad():
        full_BTKV = model(tokens_BT)
        starts = [0, *block_ends[:-1]]
        blocks = [model.decode(tokens_BT[:, a:b], cache, num_heads=model.horizon) for a, b in zip(starts, block_ends)]
        cache.crop(crop)
        if on_crop is not None:
            on_crop(cache)
        rest_BTKV = model.decode(tokens_BT[:, crop:], cache, num_heads=model.horizon)
    return full_BTKV, torch.cat([torch.cat(blocks, dim=1)[:, :crop], rest_BTKV], dim=1)


def read_prompt_then_decode(model: torch.nn.Module, tokens_BT: torch.Tensor, prompt_len: int):
    """(the full forward's logits_BTKV, a last_only read of the first prompt_len tokens (logits_B1KV), decode's
    logits of the tokens after them, read on from that cache). Every head decodes."""
    cache = model.new_cache()
    with torch.no_grad():
        full_BTKV = model(tokens_BT)
        last_B1KV = model.decode(tokens_BT[:, :prompt_len], cache, num_heads=model.horizon, last_only=True)
        after_BTKV = model.decode(tokens_BT[:, prompt_len:], cache, num_heads=model.horizon)
    return full_BTKV, last_B1KV, after_BTKV
