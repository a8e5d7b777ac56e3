"""Decoding one prompt with a KV cache: plain (heads=1) or self-speculative with the model's own heads (heads=k).

A step feeds head 0's chosen token and the drafts of heads 1..k-1 (all read at the last position) in one forward,
keeps the drafts head 0 agrees with up to the first disagreement, and cuts the cache back past the rest; the step
yields the accepted drafts plus the token before them, so at least one token. Blockwise parallel decoding (Stern et
al. 2018) as Gloeckle et al. 2024 use it with multi-token heads. With heads=1 there are no drafts and each step is
one token of plain decoding.
Shapes: T time, K heads, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wmtp_core.generation.sampling import draft_tokens, verify_drafts
from wmtp_core.generation.settings import SamplingSettings


@dataclass
class DraftCounts:
    """Per drafting head (1..k-1): drafts sent for verification and drafts accepted."""

    proposed: list[int]
    accepted: list[int]
    forward_passes: int = 0
    prompt_seconds: float = 0.0

    def record(self, num_drafts: int, num_accepted: int) -> None:
        for i in range(num_drafts):
            self.proposed[i] += 1
            self.accepted[i] += i < num_accepted


@dataclass
class Continuation:
    """The tokens generated for one prompt as they are emitted, and why they stopped (None while going on)."""

    eos_id: int | None
    budget: int
    stop_found: Callable[[list[int]], bool] = lambda token_ids: False
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def emit(self, token: int) -> bool:
        """Append a token; True once generation must stop (eos, a stop string, or the budget reached)."""
        self.token_ids.append(token)
        if token == self.eos_id:
            self.finish_reason = "eos"
        elif self.stop_found(self.token_ids):
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.budget:
            self.finish_reason = "length"
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.budget - len(self.token_ids)


def decode_prompt(
    model: torch.nn.Module,
    prompt_ids: list[int],
    out: Continuation,
    *,
    settings: SamplingSettings,
    heads: int,
    generator: torch.Generator,
    counts: DraftCounts,
) -> None:
    """Generate into `out` until it says stop; model.decode reads the prompt once, then one forward per step."""
    device = next(model.parameters()).device
    cache = model.new_cache()

    def forward(tokens: list[int], *, last_only: bool = False) -> torch.Tensor:
        counts.forward_passes += 1
        return model.decode(torch.tensor([tokens], device=device), cache, num_heads=heads, last_only=last_only)[0]

    started = time.perf_counter()
    logits_TKV = forward(prompt_ids, last_only=True)  # the heads' outputs before the prompt's end are never read
    _, next_token = verify_drafts(logits_TKV[-1:, 0], [], settings, generator)
    drafts = draft_tokens(logits_TKV[-1, 1:])  # both read the logits on the host: the forward has finished
    counts.prompt_seconds += time.perf_counter() - started
    while not out.emit(next_token):
        drafts = drafts[: out.remaining]  # the block never runs past the budget, so never past max_seq_len
        logits_TKV = forward([next_token, *drafts])
        accepted, next_token = verify_drafts(logits_TKV[:, 0], drafts, settings, generator)
        counts.record(len(drafts), accepted)
        cache.crop(cache.length - (len(drafts) - accepted))
        if any(out.emit(token) for token in drafts[:accepted]):
            return
        drafts = draft_tokens(logits_TKV[accepted, 1:])
