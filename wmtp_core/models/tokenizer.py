"""A byte-level tokenizer for the built-in model: every UTF-8 byte is a token, plus pad/bos/eos. No downloads.

It (like wmtp_core.models.hf_tokenizer's adapter) meets wmtp_core.data.tokens.Tokenizer, what the data pipeline needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from wmtp_core.data.tokens import Tokenizer


@dataclass(frozen=True)
class ByteTokenizer:
    """Token ids 0-255 are bytes; 256 is padding, 257 begins and 258 ends a sequence."""

    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def vocabulary_digest(self) -> str:
        return "wmtp-bytes-259"

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        """Text to ids; with add_special the ids are wrapped in bos ... eos."""
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def decode(self, ids: list[int]) -> str:
        """Ids back to text; special ids are dropped and invalid UTF-8 is replaced, never raised."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def check_tokenizers_agree(trunk: Tokenizer, reference: Tokenizer, *, trunk_source: str, reference_source: str) -> None:
    """Refuse a reference model whose tokenizer differs from the trunk's (its CE would score other tokens),
    naming both and what differs."""
    fields = ("vocab_size", "pad_id", "bos_id", "eos_id", "vocabulary_digest")
    differs = [
        f"{name} {getattr(trunk, name)!r} vs {getattr(reference, name)!r}"
        for name in fields
        if getattr(trunk, name) != getattr(reference, name)
    ]
    if differs:
        raise ValueError(
            f"the rho1 reference's tokenizer ({reference_source}) does not match the trunk's ({trunk_source}): "
            f"{'; '.join(differs)} (trunk vs reference); use a reference with the trunk's tokenizer"
        )
