"""What generation is asked for and what it returns: sampling settings, one generation per prompt, decoding figures.

Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_REASONS = ("eos", "stop", "length")


@dataclass(frozen=True)
class SamplingSettings:
    """temperature 0 is greedy; otherwise tokens are drawn from the top_p nucleus of softmax(logits / temperature).

    Prompt i draws from its own torch.Generator seeded from (seed, i), so its output does not depend on the other
    prompts of the call. Generation stops at the tokenizer's eos, at any of the stop strings (searched in the decoded
    new text, which is cut before it), after max_new_tokens, or where the sequence reaches model.max_seq_len.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty; leave an empty string out of `stop`")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One prompt's continuation: text is cut before a stop string; token_ids are every token generated, the eos or
    the tokens that spelled the stop string included. finish_reason: "eos", "stop" or "length"."""

    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class DecodingStats:
    """Figures of one generate() call over all its prompts.

    forward_passes counts prompt reads (one per prompt) and decoding steps; acceptance_per_head[i - 1] is the share
    of head i's drafts that head 0 accepted, of those sent for verification (empty for plain decoding). Without
    stops inside a block, tokens per decoding step = 1 + sum(acceptance_per_head).

    tokens_per_s counts the whole call; decode_tokens_per_s only what follows each prompt's read (the read yields
    the first token): the rate of the decoding steps themselves, which short continuations of long prompts hide.
    """

    tokens: int
    forward_passes: int
    seconds: float
    tokens_per_s: float
    acceptance_per_head: list[float] = field(default_factory=list)
    drafts_proposed: list[int] = field(default_factory=list)
    drafts_accepted: list[int] = field(default_factory=list)
    prompts: int = 0
    prompt_seconds: float = 0.0
    """Time spent reading prompts (one forward each, and choosing the first token)."""
    decode_tokens_per_s: float = 0.0


def decoding_stats(
    *, tokens: int, prompts: int, forward_passes: int, seconds: float, prompt_seconds: float, proposed, accepted
) -> DecodingStats:
    """DecodingStats from totals: rates, and each drafting head's acceptance over all its drafts."""
    return DecodingStats(
        tokens=tokens,
        forward_passes=forward_passes,
        seconds=seconds,
        tokens_per_s=tokens / max(seconds, 1e-9),
        acceptance_per_head=[a / p if p else 0.0 for a, p in zip(accepted, proposed)],
        drafts_proposed=list(proposed),
        drafts_accepted=list(accepted),
        prompts=prompts,
        prompt_seconds=prompt_seconds,
        decode_tokens_per_s=(tokens - prompts) / max(seconds - prompt_seconds, 1e-9),
    )
