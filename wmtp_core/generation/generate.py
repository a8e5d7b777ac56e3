"""generate(): continue text prompts with an MTPTransformer or HFMTPModel, plainly or self-speculatively.

Prompts are decoded one at a time, each with its own cache and generator. Batching rows would pad them and make
speculative steps ragged (each row accepts a different number of drafts); one row at a time, a prompt's output is
bitwise the same whatever else is in the call. What it costs is batch parallelism, which matters for large models
on GPUs, little for the small CPU models here.
"""

from __future__ import annotations

import time

import torch

from wmtp_core.data.tokens import Tokenizer
from wmtp_core.generation.decoding import Continuation, DraftCounts, decode_prompt
from wmtp_core.generation.sampling import row_generator
from wmtp_core.generation.settings import DecodingStats, Generation, SamplingSettings, decoding_stats


def generate(
    model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[str], settings: SamplingSettings, *, heads: int = 1
) -> tuple[list[Generation], DecodingStats]:
    """One Generation per prompt, and the call's decoding figures.

    heads=1 decodes plainly; heads=k drafts with heads 1..k-1 and verifies with head 0 (greedy output is the same
    token for token). A prompt's new tokens stop where prompt + new tokens reach model.max_seq_len
    (finish_reason "length"); a prompt that leaves no room raises ValueError.
    """
    _check_heads(model, heads)
    prompt_ids = [
        _encode_prompt(tokenizer, prompt, index, max_seq_len=model.max_seq_len) for index, prompt in enumerate(prompts)
    ]
    device = next(model.parameters()).device
    counts = DraftCounts(proposed=[0] * (heads - 1), accepted=[0] * (heads - 1))
    generations = []
    started = time.perf_counter()
    with torch.inference_mode():
        for row, ids in enumerate(prompt_ids):
            out = _continuation(tokenizer, settings, budget=min(settings.max_new_tokens, model.max_seq_len - len(ids)))
            generator = row_generator(settings.seed, row, device)
            decode_prompt(model, ids, out, settings=settings, heads=heads, generator=generator, counts=counts)
            generations.append(
                Generation(_text(tokenizer, out.token_ids, settings.stop), out.token_ids, out.finish_reason)
            )
    seconds = time.perf_counter() - started
    return generations, _stats(generations, counts, seconds)


def _check_heads(model: torch.nn.Module, heads: int) -> None:
    if not 1 <= heads <= model.horizon:
        raise ValueError(f"heads={heads}: choose 1 (plain decoding) up to the model's horizon ({model.horizon})")
    if model.training:
        raise ValueError(
            "generate() needs the model in eval mode (dropout would change its choices): call model.eval()"
        )


def _encode_prompt(tokenizer: Tokenizer, prompt: str, index: int, *, max_seq_len: int) -> list[int]:
    """bos + the prompt's tokens (no eos: the model continues the text)."""
    ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(prompt, add_special=False)
    if not ids:
        raise ValueError(f"prompt {index} is empty and the tokenizer has no bos token to start from; give some text")
    if len(ids) >= max_seq_len:
        raise ValueError(
            f"prompt {index} is {len(ids)} tokens, which leaves no room for new ones within "
            f"model.max_seq_len={max_seq_len}; shorten it"
        )
    return ids


def _continuation(tokenizer: Tokenizer, settings: SamplingSettings, *, budget: int) -> Continuation:
    if not settings.stop:
        return Continuation(eos_id=tokenizer.eos_id, budget=budget)

    def stop_found(token_ids: list[int]) -> bool:
        text = tokenizer.decode(token_ids)
        return any(stop in text for stop in settings.stop)

    return Continuation(eos_id=tokenizer.eos_id, budget=budget, stop_found=stop_found)


def _text(tokenizer: Tokenizer, token_ids: list[int], stop: tuple[str, ...]) -> str:
    """The decoded new text, cut before the earliest stop string in it."""
    text = tokenizer.decode(token_ids)
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]


def _stats(generations: list[Generation], counts: DraftCounts, seconds: float) -> DecodingStats:
    return decoding_stats(
        tokens=sum(len(g.token_ids) for g in generations),
        prompts=len(generations),
        forward_passes=counts.forward_passes,
        seconds=seconds,
        prompt_seconds=counts.prompt_seconds,
        proposed=counts.proposed,
        accepted=counts.accepted,
    )
