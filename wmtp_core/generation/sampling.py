"""Choosing tokens from logits: greedy or temperature/top-p sampling, and head 0's verdict on drafted tokens.

Sampling draws exactly one uniform number per token chosen, in the order tokens are chosen, so speculative decoding
(which chooses head 0's tokens one by one, stopping at the first disagreement) consumes a prompt's generator exactly
as plain decoding does.
Shapes: T time, V vocabulary.
"""

from __future__ import annotations

import random

import torch

from wmtp_core.generation.settings import SamplingSettings


def row_generator(seed: int, row: int, device: torch.device) -> torch.Generator:
    """Prompt `row`'s own generator: seeded from a string of (seed, row), so no two pairs share a stream."""
    row_seed = random.Random(f"wmtp-generate-{seed}-{row}").getrandbits(63)
    return torch.Generator(device=device).manual_seed(row_seed)


def choose_token(logits_V: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """The argmax when greedy; else one draw from the top_p nucleus of softmax(logits / temperature)."""
    if settings.greedy:
        return int(logits_V.argmax())
    probs_V = torch.softmax(logits_V.float() / settings.temperature, dim=-1)
    sorted_V, order_V = probs_V.sort(descending=True)
    # Keep the most likely tokens until their mass reaches top_p; the first is always kept.
    kept_V = torch.where(sorted_V.cumsum(0) - sorted_V < settings.top_p, sorted_V, torch.zeros_like(sorted_V))
    cumulative_V = kept_V.cumsum(0)
    u = torch.rand((), generator=generator, device=logits_V.device) * cumulative_V[-1]
    index = torch.searchsorted(cumulative_V, u, right=True).clamp(max=len(kept_V) - 1)
    return int(order_V[index])


def verify_drafts(
    head0_logits_TV: torch.Tensor, drafts: list[int], settings: SamplingSettings, generator: torch.Generator
) -> tuple[int, int]:
    """(how many drafts head 0 accepts, head 0's next token after them).

    head0_logits_TV[t] is head 0 at the position before drafts[t]. A draft is accepted iff it equals the token head
    0 chooses there (its argmax, or its sample when sampling), so every token kept is head 0's own choice and the
    output is distributed exactly as plain decoding's.
    """
    if settings.greedy:  # one argmax and one host transfer for the whole block
        choices = head0_logits_TV.argmax(-1).tolist()
        accepted = 0
        while accepted < len(drafts) and choices[accepted] == drafts[accepted]:
            accepted += 1
        return accepted, choices[accepted]
    for accepted, draft in enumerate(drafts):
        token = choose_token(head0_logits_TV[accepted], settings, generator)
        if token != draft:
            return accepted, token
    return len(drafts), choose_token(head0_logits_TV[len(drafts)], settings, generator)


def draft_tokens(draft_logits_KV: torch.Tensor) -> list[int]:
    """Heads 1..k-1's most likely tokens at one position: the drafts for the k-1 tokens after head 0's."""
    return draft_logits_KV.argmax(-1).tolist()
