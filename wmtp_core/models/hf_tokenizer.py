"""A Hugging Face tokenizer behind the interface the data pipeline uses (wmtp_core.data.tokens.Tokenizer), so
TokenSequences and MTPCollator work with it as with ByteTokenizer. transformers is imported only when one is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFTokenizer:
    """encode() wraps the text's ids in bos ... eos (each only where the tokenizer has one), whatever the tokenizer's
    own add_special_tokens would do, so every model family gets the same sequence layout.

    pad_id: the tokenizer's pad token; without one its unk token (when distinct from bos/eos, as in Llama 2), else
    eos. Padding is told apart from text by `tokens != pad_id`, so with pad = eos the final eos counts as padding
    for the critic's value mask and token counts (labels are unaffected: they come from sequence lengths).
    """

    tokenizer: object = field(repr=False)
    source: str
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def vocabulary_digest(self) -> str:
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda item: item[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not add_special:
            return ids
        return [
            *([self.bos_id] if self.bos_id is not None else []),
            *ids,
            *([self.eos_id] if self.eos_id is not None else []),
        ]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """The tokenizer saved beside a causal LM (a local directory or a hub id)."""
    tokenizer = import_transformers().AutoTokenizer.from_pretrained(path)
    return HFTokenizer(
        tokenizer,
        source=path,
        pad_id=_pad_id(tokenizer, path),
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
    )


def _pad_id(tokenizer, path: str) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    unk = tokenizer.unk_token_id
    if unk is not None and unk not in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        return unk
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer at {path} has no pad, unk or eos token to pad with; add a pad token to it")
    log.warning(
        "the tokenizer at %s has no pad token: padding with eos (id %d), so a sequence's final eos counts as "
        "padding in the critic's value mask",
        path,
        tokenizer.eos_token_id,
    )
    return tokenizer.eos_token_id


def import_transformers():
    """transformers, or an error saying how to install it; its progress bars would flood the run log."""
    try:
        import transformers
    except ImportError:
        raise ImportError("model.source=hf needs transformers: install it with `uv sync --extra hf`") from None
    transformers.utils.logging.disable_progress_bar()
    return transformers
